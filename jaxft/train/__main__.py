"""`python -m jaxft.train CONFIG.yaml [dotted.key=value ...]`: supervised fine-tuning.

Examples:
  python -m jaxft.train configs/quickstart.yaml
  python -m jaxft.train configs/quickstart.yaml optim.lr=1e-4 train.steps=50 output_dir=runs/try2
  python -m jaxft.train configs/quickstart.yaml --check      # validate config and data (no weights, no compute)
  python -m jaxft.train --help-config                        # every config key: type, default, meaning

Re-running with the same config and output_dir resumes from the last checkpoint; a different config in an existing
output_dir is refused. SIGTERM or Ctrl-C saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import sys

from jaxft.data import check_sources
from jaxft.errors import JaxftError
from jaxft.train.config import load_config
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
        summary = run(cfg)
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary.get("stopped", "").startswith(("completed", "SIG")) else 1


if __name__ == "__main__":
    sys.exit(main())
