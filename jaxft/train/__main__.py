"""`python -m jaxft.train CONFIG.yaml [dotted.key=value ...]`: supervised fine-tuning.

Examples:
  python -m jaxft.train configs/quickstart.yaml
  python -m jaxft.train configs/quickstart.yaml optim.lr=1e-4 train.steps=50 output_dir=runs/try2
  python -m jaxft.train configs/quickstart.yaml --check      # validate the config (no weights, no compute)

Re-running with the same config and output_dir resumes from the last checkpoint; a different config in an existing
output_dir is refused. SIGTERM or Ctrl-C saves a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the run's YAML config (see configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    args = ap.parse_args(argv)
    if not args.check:
        from jaxft.runtime import keep_freed_host_memory

        keep_freed_host_memory()  # before anything starts JAX's threads

    from jaxft.errors import JaxftError
    from jaxft.train.config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.check:
            print(f"{args.config}: valid ({cfg.method_type} on {cfg.model.path}, output_dir {cfg.output_dir})")
            return 0
        from jaxft.train.loop import run

        summary = run(cfg)
    except (JaxftError, OSError, ValueError) as e:  # every input error is a JaxftError; the others a backstop
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if summary.get("stopped", "").startswith(("completed", "SIG")) else 1


if __name__ == "__main__":
    sys.exit(main())
