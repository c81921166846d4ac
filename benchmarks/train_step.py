"""LoRA training-step tokens/s: jaxft vs transformers + peft (torch eager), SmolLM2-135M, CPU fp32.

LoRA r16 alpha 32 on all linear layers, batch 4 x 512 tokens, loss on every token, AdamW; each side at its
fastest setting (jaxft: jit, no remat; torch: eager, sdpa attention, no gradient checkpointing). One process; the
two sides take turns step by step, so drift in the machine's speed hits both; prints the ratio of the median step
times last (> 1 means jaxft is faster). Goal: >= 1.2x. torch.compile's figure is reported if it runs
(--compile).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]
from common import report, timeit, torch_smollm  # noqa: E402


def jax_side(ids: np.ndarray, scan_layers: bool = True):
    """`(run, compile_s)`: one blocking train step of jaxft, and the first call's time (compile + one step)."""
    import jax
    import jax.numpy as jnp

    import jaxft
    from jaxft import peft
    from jaxft.models.llama import ModelOptions
    from jaxft.train.optim import OptimConfig, make_optimizer
    from jaxft.train.step import Model, make_train_step

    config, params = jaxft.load_pretrained("smollm2-135m-instruct")
    spec = peft.LoraSpec(r=16, alpha=32, target_modules="all-linear")
    adapter = peft.init(spec, config, params, jax.random.key(0))
    model = Model(config, spec, ModelOptions(scan_layers=scan_layers))
    opt = make_optimizer(OptimConfig(lr=1e-4), adapter, 100)
    state = opt.init(adapter)
    step = make_train_step(model, opt)
    b, t = ids.shape
    batch = {"input_ids": jnp.asarray(ids)[None], "segment_ids": jnp.ones((1, b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t), (1, b, t)).astype(jnp.int32),
             "loss_mask": jnp.ones((1, b, t), bool)}
    rng = jax.random.key(1)
    holder = {"a": adapter, "s": state}

    def run():
        holder["a"], holder["s"], m = step(holder["a"], holder["s"], params, batch, rng)
        m["loss"].block_until_ready()

    t0 = time.perf_counter()
    run()
    return run, time.perf_counter() - t0


def torch_side(ids: np.ndarray, compile_model: bool):
    """One blocking train step of transformers + peft (forward, backward, AdamW)."""
    import torch
    from peft import LoraConfig, get_peft_model

    model = torch_smollm("sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fwd = torch.compile(model) if compile_model else model
    ids_t = torch.tensor(ids)

    def run():
        out = fwd(input_ids=ids_t, labels=ids_t)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def alternate(runs: dict, repeat: int) -> dict[str, list[float]]:
    """Seconds per step of each side, the sides taking turns step by step (after one warm-up step each), so a
    machine whose speed drifts during the run slows both sides alike instead of biasing the ratio."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5, help="steps timed per side, taking turns")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--unrolled", action="store_true", help="jaxft: unroll the layer loop instead of lax.scan")
    ap.add_argument("--jax-only", action="store_true", help="time jaxft alone (no record)")
    args = ap.parse_args(argv)
    ids = np.random.RandomState(0).randint(0, 49152, (args.batch, args.seq))
    tokens = args.batch * args.seq
    jax_run, compile_s = jax_side(ids, scan_layers=not args.unrolled)
    if args.jax_only:
        print(f"jaxft {tokens / timeit(jax_run, repeat=args.repeat):.0f} tokens/s (compile {compile_s:.1f} s)")
        return
    runs = {"jaxft (jit)": jax_run, "transformers + peft (eager, sdpa)": torch_side(ids, False)}
    if args.compile:
        try:
            runs["transformers + peft (torch.compile)"] = torch_side(ids, True)
        except Exception as e:  # report, do not hide: compile support varies by platform
            print(f"torch.compile failed: {type(e).__name__}: {e}")
    times = alternate(runs, args.repeat)
    med = {name: float(np.median(t)) for name, t in times.items()}
    lines = ["| side | tokens/s (median) | range |", "|---|---|---|"]
    lines += [f"| {name} | {tokens / med[name]:.0f} | {tokens / max(t):.0f}-{tokens / min(t):.0f} |"
              for name, t in times.items()]
    j, tq = times["jaxft (jit)"], times["transformers + peft (eager, sdpa)"]
    per_round = sorted(b / a for a, b in zip(j, tq))
    ratio = med["transformers + peft (eager, sdpa)"] / med["jaxft (jit)"]
    lines += ["", f"LoRA r16 all-linear, batch {args.batch} x {args.seq}, fp32; {args.repeat} steps per side, taking "
              f"turns; jaxft first step (compile) {compile_s:.1f} s. Ratio per round "
              f"{per_round[0]:.2f}-{per_round[-1]:.2f}x.", "",
              f"**ratio jaxft / transformers+peft eager (medians): {ratio:.2f}x** (goal >= 1.2x)"]
    report("train_step", lines, ratio, record_it=not args.no_record)


if __name__ == "__main__":
    main()
