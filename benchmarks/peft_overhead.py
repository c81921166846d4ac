"""What LoRA and DoRA cost on top of the frozen base model in a training step (CPU, fp32 by default).

    python benchmarks/peft_overhead.py [--batch 4] [--seq 512] [--rank 16] [--reps 5] [--no-record]
    python benchmarks/peft_overhead.py --quick      # 2 layers, 1 x 64 tokens, one repetition, nothing recorded

Writes its section of benchmarks/RESULTS.md (`peft_overhead`) unless `--no-record` or `--quick`.

Model: SmolLM2-135M's shape (the embedded model's config, random weights from `init_params`; timing does not depend
on the values). Three jitted steps, each `value_and_grad` of the same next-token cross-entropy:

- frozen: the base model with gradients w.r.t. the input embeddings only (the backward pass propagates activation
  gradients through every layer but computes no weight gradient): the floor any adapter step pays;
- lora:   LoRA r16 on every linear layer but lm_head, gradients w.r.t. the adapter tree;
- dora:   DoRA, same targets and rank.

Goals (issue 3): lora / frozen <= 1.15, dora / lora <= 1.2. Prints the min and median wall time of `--reps` runs
after one warm-up of each (run round-robin), and the ratios; on a shared machine the min is the steadier figure.
The base parameters are jit arguments (not constants), as in training, and freed host memory is kept mapped
(`jaxft.runtime.keep_freed_host_memory`), as `python -m jaxft.train` runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]  # this checkout's jaxft, not an installed one

from jaxft.runtime import keep_freed_host_memory  # noqa: E402

keep_freed_host_memory()  # before JAX starts its threads, as the train job does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import report  # noqa: E402

import jaxft  # noqa: E402
from jaxft import peft  # noqa: E402

GOALS = {("lora", "frozen"): 1.15, ("dora", "lora"): 1.20}
NAMES = {"frozen": "frozen base (input gradients only)", "lora": "LoRA r{r} all-linear", "dora": "DoRA r{r} all-linear"}


def _ce(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def _time(steps: dict, reps: int) -> dict[str, tuple[float, float]]:
    """(min, median) wall time per step. The steps run round-robin (one of each per round, after a warm-up of each), so
    a change of load on a shared machine hits them alike rather than skewing one."""
    for fn, args in steps.values():
        jax.block_until_ready(fn(*args))  # compile + warm-up
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):
        for name, (fn, args) in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def main(argv=None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--no-record", action="store_true", help="do not write benchmarks/RESULTS.md")
    ap.add_argument("--quick", action="store_true", help="sanity check: 2 layers, 1 x 64 tokens, 1 repetition, "
                    "nothing recorded")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.batch, args.seq, args.reps, args.no_record = 2, 1, 64, 1, True

    config = jaxft.load_config("smollm2-135m-instruct")
    if args.layers:
        config = config.replace(num_hidden_layers=args.layers)
    params = jaxft.init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, config.vocab_size)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    @jax.jit
    def frozen(params, embeds):
        def loss(e):
            return _ce(jaxft.forward(config, params, inputs, embeds=e), targets)

        return jax.value_and_grad(loss)(embeds)

    def adapter_step(spec):
        @jax.jit
        def step(params, adapter):
            def loss(a):
                return _ce(jaxft.forward(config, peft.bind(params, spec, a), inputs), targets)

            return jax.value_and_grad(loss)(adapter)

        return step

    embeds = jnp.take(params["model"]["embed_tokens"]["weight"], inputs, axis=0)
    steps = {"frozen": (frozen, (params, embeds))}
    for name, cls in (("lora", peft.LoraSpec), ("dora", peft.DoraSpec)):
        spec = cls(r=args.rank, alpha=2.0 * args.rank, target_modules="all-linear")
        adapter = peft.init(spec, config, params, jax.random.key(2))
        # non-zero B so that no work can be skipped as zero
        adapter = jax.tree.map(lambda x: x + 1e-3, adapter)
        steps[name] = (adapter_step(spec), (params, adapter))
    results = _time(steps, args.reps)

    shape = (f"{config.num_hidden_layers} layers of SmolLM2-135M's shape, batch {args.batch} x {args.seq}, "
             f"rank {args.rank} on every linear layer but lm_head, fp32")
    print(f"device={jax.devices()[0].device_kind} {shape}")
    for k, (best, med) in results.items():
        print(f"  {k:7s} step min {best:8.3f} s  median {med:8.3f} s   {args.batch * args.seq / best:8.1f} tokens/s")
    lines = ["| step | min (s) | median (s) |", "|---|---|---|"]
    lines += [f"| {NAMES[k].format(r=args.rank)} | {best:.2f} | {med:.2f} |" for k, (best, med) in results.items()]
    reps = f"{args.reps} repetition{'s' * (args.reps != 1)}"
    lines += ["", f"{shape}; the three steps run in rotation, {reps} after a warm-up of each, in "
              f"one process with freed host memory kept mapped (as the train job runs).", ""]
    for (a, b), goal in GOALS.items():
        lo, mid = results[a][0] / results[b][0], results[a][1] / results[b][1]
        lines += [f"**{a} / {b}: {lo:.3f}x on the minimum ({mid:.3f}x on the median); goal <= {goal}x.**", ""]
    report("peft_overhead", lines[:-1], results["lora"][0] / results["frozen"][0], record_it=not args.no_record)
    return results


if __name__ == "__main__":
    main()
