"""What LoRA and DoRA cost on top of the frozen base model in a training step (CPU, fp32 by default).

    python benchmarks/peft_overhead.py [--batch 4] [--seq 512] [--rank 16] [--reps 3]

Model: SmolLM2-135M's shape (the embedded model's config, random weights from `init_params`; timing does not depend
on the values). Three jitted steps, each `value_and_grad` of the same next-token cross-entropy:

- frozen: the base model with gradients w.r.t. the input embeddings only (the backward pass propagates activation
  gradients through every layer but computes no weight gradient): the floor any adapter step pays;
- lora:   LoRA r16 on every linear layer but lm_head, gradients w.r.t. the adapter tree;
- dora:   DoRA, same targets and rank.

Goals (issue 3): lora / frozen <= 1.15, dora / lora <= 1.2. Prints the min and median wall time of `--reps` runs
after one warm-up of each (run round-robin), and the ratios; on a shared machine the min is the steadier figure. The base parameters are jit arguments (not constants), as in
training.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import jaxft
from jaxft import peft


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
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    args = ap.parse_args(argv)

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

    print(f"device={jax.devices()[0].device_kind} layers={config.num_hidden_layers} batch={args.batch} "
          f"seq={args.seq} rank={args.rank} fp32")
    for k, (best, med) in results.items():
        print(f"  {k:7s} step min {best:8.3f} s  median {med:8.3f} s   {args.batch * args.seq / best:8.1f} tokens/s")
    for (a, b), goal in ((("lora", "frozen"), 1.15), (("dora", "lora"), 1.20)):
        print(f"  {a} / {b}: min {results[a][0] / results[b][0]:.3f}  median {results[a][1] / results[b][1]:.3f}"
              f"   (goal <= {goal})")
    return results


if __name__ == "__main__":
    main()
