"""`python -m jaxft.plan CONFIG [dotted.key=value ...] [--devices N] [--device-memory 80GiB] [--json]`

Will this training run fit? Compiles the trainer's step ahead of time on abstract arrays (no weights are read;
the model's config.json is enough, e.g. `model.path=configs/models/llama-3.1-8b`) for a mesh of N devices (faked as
CPU devices when this host has fewer), prints per device the parameters, optimizer state, gradients, activations
and the total against the device's memory beside the rule-of-thumb estimate, and when it does not fit, the config
overrides that would (each candidate planned). Exit 0 when it fits, 1 when it does not, 2 on bad input.

Examples:
  python -m jaxft.plan configs/llama3.1-8b-lora.yaml model.path=configs/models/llama-3.1-8b --device-memory 24GiB
  python -m jaxft.plan configs/llama3.1-70b-full-fsdp.yaml --devices 64 --device-memory 80GiB --json
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

from jaxft.errors import JaxftError
from jaxft.plan.memory import parse_bytes
from jaxft.plan.planner import format_report, plan_config


def _fake_devices(n: int) -> None:
    """Give this process `n` CPU devices; must run before jax starts a backend (nothing here has)."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxft.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="the run's YAML config (as for python -m jaxft.train)")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, values parsed as YAML")
    ap.add_argument("--devices", type=int, default=None,
                    help="plan for N devices (faked as N CPU devices); default: this host's devices")
    ap.add_argument("--device-memory", default=None,
                    help="memory of one device, e.g. 80GiB, 16G, 40GB (default: the device's own; on CPU the "
                         "host's memory over the devices)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--no-recommend", action="store_true", help="only plan the config as given")
    args = ap.parse_intermixed_args(argv)
    try:
        if args.devices is not None:
            if args.devices < 1:
                raise JaxftError(f"--devices: must be at least 1, got {args.devices}")
            _fake_devices(args.devices)
        memory = parse_bytes(args.device_memory) if args.device_memory is not None else None
        progress = (lambda s: print(f"plan: {s}", file=sys.stderr, flush=True))
        report = plan_config(args.config, args.overrides, devices=args.devices, device_memory=memory,
                             recommend_fix=not args.no_recommend, progress=progress)
    except (JaxftError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_json()) if args.json else format_report(report), flush=True)
    return 0 if report.plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
