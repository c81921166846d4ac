"""`python -m jaxft.train CONFIG.yaml [dotted.key=value ...]`: supervised fine-tuning.

Examples:
  python -m jaxft.train configs/quickstart.yaml
  python -m jaxft.train configs/quickstart.yaml optim.lr=1e-4 train.steps=50 output_dir=runs/try2
  python -m jaxft.train configs/quickstart.yaml --check      # validate config and data (no weights, no compute)
  python -m jaxft.train configs/quickstart.yaml --plan       # refuse before loading when the step cannot fit
  python -m jaxft.train --help-config                        # every config key: type, default, meaning

Re-running with the same config and output_dir resumes from the last checkpoint; a different config in an existing
output_dir is refused. SIGTERM or Ctrl-C saves a checkpoint and exits 0.

On GPU and TPU (and on any platform with --plan) the memory planner (`jaxft.plan.check_fits`) compiles the step
ahead of time on abstract arrays before any weight is read, and a run that does not fit in the device's memory is
refused with the planner's answer: the overrides that would fit, or why nothing tried does.
"""

from __future__ import annotations

import argparse
import sys

import jax

from jaxft.data import check_sources
from jaxft.errors import JaxftError
from jaxft.parallel import distributed
from jaxft.plan import check_fits, parse_bytes
from jaxft.train.config import TrainConfig, load_config
from jaxft.train.loop import run
from jaxft.train.preflight import check
from jaxft.train.reference import reference_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="the run's YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
    ap.add_argument("--check", action="store_true",
                    help="validate the config and read the data files (no weights, no compute), and exit")
    ap.add_argument("--plan", action=argparse.BooleanOptionalAction, default=None,
                    help="plan the step's memory per device before any weight is read and refuse a run that does "
                         "not fit (default: on GPU and TPU, off on CPU)")
    ap.add_argument("--device-memory", default=None,
                    help="with the plan: the memory of one device to fit in, e.g. 40GiB (default: the device's own)")
    ap.add_argument("--help-config", action="store_true",
                    help="list every config key with its type, default and meaning, and exit")
    ap.add_argument("--markdown", action="store_true", help="with --help-config: print Markdown (docs/config.md)")
    args = ap.parse_intermixed_args(argv)  # flags may come after the overrides
    if args.help_config:
        sys.stdout.write(reference_text(args.markdown))
        return 0
    if args.config is None:
        ap.error("the config file is required (or --help-config)")
    if not args.check:
        from jaxft.runtime import keep_freed_host_memory

        keep_freed_host_memory()  # before anything starts JAX's threads

    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            stats = check_sources(cfg.data)
            train = [s for s in stats if s.where.startswith("data.train")]
            evals = [s for s in stats if s.where.startswith("data.eval")]
            malformed = sum(s.malformed for s in stats)
            print(f"{args.config}: valid ({cfg.method_type} on {cfg.model.path}, output_dir {cfg.output_dir}); "
                  f"data: {sum(s.kept for s in train)} train and {sum(s.kept for s in evals)} eval records from "
                  f"{len(cfg.data.train) + len(cfg.data.eval)} sources, {malformed} malformed"
                  + (" (see python -m jaxft.data inspect)" if malformed else ""))
            print(f"{args.config}: {check(cfg)}")  # the trainer's own checks: warm-up, eval split, output_dir
            return 0
        plan_fits(cfg, args.config, args.overrides, args.plan, args.device_memory)
        summary = run(cfg)
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary.get("stopped", "").startswith(("completed", "SIG")) else 1


def plan_fits(cfg: TrainConfig, path: str, overrides: list[str], plan: bool | None,
              device_memory: str | None) -> None:
    """The planner's check of the run before it loads anything (`plan` None: on accelerators only): raises the
    planner's one-line `ConfigError` (the overrides that fit, or why nothing does) when the step does not fit. It
    plans with the compute dtype this platform runs (`compute_dtype: auto` resolved) on this run's devices (all
    processes': `jax.distributed` starts first)."""
    memory = parse_bytes(device_memory) if device_memory is not None else None
    distributed.initialize(cfg.parallel.distributed)
    if plan is False or (plan is None and jax.default_backend() == "cpu"):
        return
    dtype = f"model.compute_dtype={cfg.model.resolved_compute_dtype()}"
    report = check_fits(path, [*overrides, dtype], device_memory=memory,
                        progress=lambda s: print(f"plan: {s}", file=sys.stderr, flush=True))
    p = report.plan
    print(f"plan: {p.total / 2 ** 30:.2f} GiB per device of {p.device_memory / 2 ** 30:.2f} GiB: fits "
          f"({report.recommendation.why})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
