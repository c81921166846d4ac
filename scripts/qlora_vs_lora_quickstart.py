"""Does QLoRA match LoRA on the quickstart? Runs (or reads, when their run directories already hold a finished run)
configs/quickstart.yaml and configs/quickstart-qlora.yaml and checks issue 15's bar on the whole eval split (150
prompts): QLoRA's eval loss within 5% of LoRA's, its exact match no more than 3 points below.

    python scripts/qlora_vs_lora_quickstart.py [--out runs/compare] [--seeds 0 1 ...] [--cross]

Cost: two quickstart runs per seed, about 8 minutes each on 2 CPU cores (each ~6 min of training at ~115-160
tokens/s, ~1 min of generation before and after, the exports and their checks); a finished run is read, not
repeated. Exit status 1 when the bar is missed. `--seeds` runs both configs with each `train.seed` (initialisation,
dropout, batch order) in `<out>/lora-sN`, `<out>/qlora-sN`, and judges the bar on the means over the seeds: at
an eval loss of ~0.003 nats a token one run's loss moves by 2x from seed to seed (benchmarks/RESULTS.md). `--cross`
also scores each run's adapter on the other's base (the LoRA adapter over the NF4 base, the QLoRA adapter over the
dense one): the eval loss on the same eval split, about 1 minute a seed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jaxft
from jaxft import data as jdata
from jaxft import peft, quant
from jaxft.train import StaticModel, eval_loss, load_config, make_eval_step, run

LOSS_RATIO, EXACT_POINTS = 1.05, 3.0


def _summary(config: str, out: str, seed: int) -> dict:
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        run(load_config(config, [f"output_dir={out}", f"train.seed={seed}"]))
    with open(path) as f:
        return json.load(f)


def cross_eval(lora_dir: str, qlora_dir: str) -> dict[tuple[str, str], float]:
    """`{(adapter, base): eval loss}` of each run's adapter over the dense and the NF4 base (the QLoRA config's
    quantize section), on the quickstart's eval split, fp32."""
    qcfg = load_config("configs/quickstart-qlora.yaml")
    tokenizer = jaxft.load_tokenizer(qcfg.model.path)
    data = jdata.prepare(qcfg.data, tokenizer)
    config, dense = jaxft.load_pretrained(qcfg.model.path)
    bases = {"dense": dense, "nf4": quant.quantize_params(dense, quant.QuantPlan.from_section(qcfg.quantize))}
    out = {}
    for name, d in (("lora", lora_dir), ("qlora", qlora_dir)):
        spec, adapter = peft.load_adapter(os.path.join(d, "adapter"), config)
        step = make_eval_step(StaticModel(config, spec, jaxft.ModelOptions()))
        for base, params in bases.items():
            out[(name, base)] = eval_loss(step, adapter, params, data, qcfg.eval.batch_size)
            print(f"{name} adapter over the {base} base: eval loss {out[(name, base)]:.5f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/compare", help="parent directory of the run directories")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="train.seed of the runs, both configs each (default: one run of each, the configs' seed)")
    ap.add_argument("--cross", action="store_true", help="also score each adapter over the other's base")
    args = ap.parse_args(argv)
    runs = [("", 0)] if args.seeds is None else [(f"-s{s}", s) for s in args.seeds]
    means = {}
    for name, config in (("lora", "configs/quickstart.yaml"), ("qlora", "configs/quickstart-qlora.yaml")):
        got = [_summary(config, os.path.join(args.out, name + tail), seed) for tail, seed in runs]
        for (tail, seed), s in zip(runs, got):
            print(f"{name:6s} seed {seed}  eval loss {s['eval loss']:.5f}  exact match "
                  f"{s['exact match after (%)']:.1f}%  tokens/s {s.get('tokens/s', float('nan')):.0f}")
        means[name] = {k: sum(s[k] for s in got) / len(got) for k in ("eval loss", "exact match after (%)")}
    lora, qlora = means["lora"], means["qlora"]
    loss_ok = qlora["eval loss"] <= LOSS_RATIO * lora["eval loss"]
    exact_ok = qlora["exact match after (%)"] >= lora["exact match after (%)"] - EXACT_POINTS
    over = "" if len(runs) == 1 else f" (means over {len(runs)} seeds)"
    print(f"eval loss ratio {qlora['eval loss'] / lora['eval loss']:.3f}{over} (bar <= {LOSS_RATIO}): "
          f"{'met' if loss_ok else 'MISSED'}; exact match {qlora['exact match after (%)'] - lora['exact match after (%)']:+.1f} "
          f"points (bar >= -{EXACT_POINTS}): {'met' if exact_ok else 'MISSED'}")
    if args.cross:
        for tail, _ in runs:
            cross_eval(os.path.join(args.out, "lora" + tail), os.path.join(args.out, "qlora" + tail))
    return 0 if loss_ok and exact_ok else 1


if __name__ == "__main__":
    sys.exit(main())
