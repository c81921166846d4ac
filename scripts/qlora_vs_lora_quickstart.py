"""Does QLoRA match LoRA on the quickstart? Runs (or reads, when their run directories already hold a finished run)
configs/quickstart.yaml and configs/quickstart-qlora.yaml and checks issue 15's bar on the whole eval split (150
prompts): QLoRA's eval loss within 5% of LoRA's, its exact match no more than 3 points below.

    python scripts/qlora_vs_lora_quickstart.py [--out runs/compare]

Cost: two quickstart runs, about 6 minutes each on 2 CPU cores (each ~4 min of training at ~135 tokens/s, ~1 min
of generation before and after, the exports and their checks); a finished run is read, not repeated. Exit status 1
when the bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxft.train import load_config, run

LOSS_RATIO, EXACT_POINTS = 1.05, 3.0


def _summary(config: str, out: str) -> dict:
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        run(load_config(config, [f"output_dir={out}"]))
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/compare", help="parent directory of the two run directories")
    args = ap.parse_args(argv)
    lora = _summary("configs/quickstart.yaml", os.path.join(args.out, "lora"))
    qlora = _summary("configs/quickstart-qlora.yaml", os.path.join(args.out, "qlora"))
    loss_ok = qlora["eval loss"] <= LOSS_RATIO * lora["eval loss"]
    exact_ok = qlora["exact match after (%)"] >= lora["exact match after (%)"] - EXACT_POINTS
    for name, s in (("lora", lora), ("qlora", qlora)):
        print(f"{name:6s} eval loss {s['eval loss']:.5f}  exact match {s['exact match after (%)']:.1f}%  "
              f"tokens/s {s.get('tokens/s', float('nan')):.0f}")
    print(f"eval loss ratio {qlora['eval loss'] / lora['eval loss']:.3f} (bar <= {LOSS_RATIO}): "
          f"{'met' if loss_ok else 'MISSED'}; exact match {qlora['exact match after (%)'] - lora['exact match after (%)']:+.1f} "
          f"points (bar >= -{EXACT_POINTS}): {'met' if exact_ok else 'MISSED'}")
    return 0 if loss_ok and exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
