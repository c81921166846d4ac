"""What LoRA and DoRA cost on top of the frozen base model in a training step (CPU, fp32 by default).

    python benchmarks/peft_overhead.py [--batch 4] [--seq 512] [--rank 16] [--reps 3]

Model: SmolLM2-135M's shape (the embedded model's config, random weights from `init_params`; timing does not depend
on the values). Three jitted steps, each `value_and_grad` of the same next-token cross-entropy:

- frozen: the base model with gradients w.r.t. the input embeddings only (the backward pass propagates activation
  gradients through every layer but computes no weight gradient): the floor any adapter step pays;
- lora:   LoRA r16 on every linear layer but lm_head, gradients w.r.t. the adapter tree;
- dora:   DoRA, same targets and rank.

Goals (issue 3): lora / frozen <= 1.15, dora / lora <= 1.2. Prints the median wall time of `--reps` runs after one
warm-up, and the ratios. The base parameters are jit arguments (not constants), as in training.
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


def _time(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    results = {"frozen": _time(frozen, (params, embeds), args.reps)}
    for name, cls in (("lora", peft.LoraSpec), ("dora", peft.DoraSpec)):
        spec = cls(r=args.rank, alpha=2.0 * args.rank, target_modules="all-linear")
        adapter = peft.init(spec, config, params, jax.random.key(2))
        # non-zero B so that no work can be skipped as zero
        adapter = jax.tree.map(lambda x: x + 1e-3, adapter)
        results[name] = _time(adapter_step(spec), (params, adapter), args.reps)

    print(f"device={jax.devices()[0].device_kind} layers={config.num_hidden_layers} batch={args.batch} "
          f"seq={args.seq} rank={args.rank} fp32")
    for k, v in results.items():
        print(f"  {k:7s} step {v:8.3f} s   {args.batch * args.seq / v:8.1f} tokens/s")
    print(f"  lora / frozen = {results['lora'] / results['frozen']:.3f}   (goal <= 1.15)")
    print(f"  dora / lora   = {results['dora'] / results['lora']:.3f}   (goal <= 1.20)")
    return results


if __name__ == "__main__":
    main()
