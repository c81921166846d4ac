"""Chunked cross-entropy forward+backward: jaxft (jit) vs torch, CPU fp32, SmolLM2 sizes.

    python benchmarks/loss.py [--reps 5] [--chunk-sizes 512] [--naive] [--frozen-head]

N = 4 * 512 tokens, D = 576, V = 49152. Both compute the summed loss and its gradients w.r.t. the hidden states AND
the head weight (full fine-tuning). torch: `logits = h @ W.T; F.cross_entropy(..., reduction='sum'); backward()`.
The runs are interleaved (jaxft, torch, jaxft, ...) so that load from other processes hits both alike; the best of
`--reps` is reported, as wall time and as process CPU time (steadier on a shared machine). `--naive` adds the
plain-JAX reference (log_softmax + take_along_axis, autodiff); `--frozen-head` adds the LoRA case (no head
gradient) on both sides. The last line is the ratio torch_time / jaxft_time: > 1 means jaxft is faster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jaxft.ops.loss import DEFAULT_CHUNK_SIZE, cross_entropy_sum  # noqa: E402

N, D, V = 4 * 512, 576, 49152


def _time(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): on a shared machine CPU time is the steadier measure of work."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE])
    ap.add_argument("--naive", action="store_true", help="also time log_softmax + take_along_axis with autodiff")
    ap.add_argument("--frozen-head", action="store_true", help="also time gradients w.r.t. h only (LoRA)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    h_np = rng.standard_normal((N, D), dtype=np.float32)
    w_np = (rng.standard_normal((D, V), dtype=np.float32) * 0.05).astype(np.float32)
    t_np = rng.integers(0, V, N)
    h, w = jnp.asarray(h_np), jnp.asarray(w_np)
    targets, mask = jnp.asarray(t_np, jnp.int32), jnp.ones((N,), bool)

    cases = {}  # name -> (jitted fn of (h, w), its torch counterpart's name)
    for cs in args.chunk_sizes:
        loss_fn = lambda h, w, cs=cs: cross_entropy_sum(h, w, targets, mask, chunk_size=cs)[0]  # noqa: E731
        cases[f"jaxft chunk={cs}"] = (jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))), "torch")
        if args.frozen_head:
            cases[f"jaxft frozen head chunk={cs}"] = (jax.jit(jax.value_and_grad(loss_fn)), "torch frozen head")
    if args.naive:

        def naive(h, w):
            logp = jax.nn.log_softmax(h @ w, axis=-1)
            return -jnp.sum(jnp.take_along_axis(logp, targets[:, None], axis=-1))

        cases["jax naive"] = (jax.jit(jax.value_and_grad(naive, argnums=(0, 1))), "torch")

    th = torch.from_numpy(h_np).requires_grad_(True)
    tw = torch.from_numpy(np.ascontiguousarray(w_np.T)).requires_grad_(True)  # torch's [V, D] layout
    tw_frozen = tw.detach()
    tt = torch.from_numpy(t_np)

    def torch_step(head):
        th.grad = tw.grad = None
        F.cross_entropy(th @ head.T, tt, reduction="sum").backward()

    torch_cases = {"torch": lambda: torch_step(tw)}
    if args.frozen_head:
        torch_cases["torch frozen head"] = lambda: torch_step(tw_frozen)

    # Warm up (compile) and check that both compute the same thing.
    for fn, _ in cases.values():
        jax.block_until_ready(fn(h, w))
    loss, (gh, gw) = cases[f"jaxft chunk={args.chunk_sizes[0]}"][0](h, w)
    torch_step(tw)
    t_loss = F.cross_entropy(th @ tw.T, tt, reduction="sum").item()
    print(f"loss jaxft {float(loss):.6g} torch {t_loss:.6g}; max |dW diff| "
          f"{float(np.abs(np.asarray(gw) - tw.grad.numpy().T).max()):.2e}")

    times = {name: [] for name in list(cases) + list(torch_cases)}
    for _ in range(args.reps):
        for name, (fn, _) in cases.items():
            times[name].append(_time(lambda: jax.block_until_ready(fn(h, w))))
        for name, fn in torch_cases.items():
            times[name].append(_time(fn))

    print(f"CPU fp32, N={N} D={D} V={V}, forward+backward, best of {args.reps} interleaved runs; "
          f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    best = {}
    for name, ts in times.items():
        walls, cpus = sorted(t[0] for t in ts), sorted(t[1] for t in ts)
        best[name] = (walls[0], cpus[0])
        print(f"  {name:30s} wall best {walls[0]:7.3f} s median {walls[len(ts) // 2]:7.3f} s | "
              f"CPU best {cpus[0]:7.3f} s median {cpus[len(ts) // 2]:7.3f} s")
    if args.frozen_head:
        frozen = [n for n in cases if n.startswith("jaxft frozen")]
        print(f"frozen head (grad w.r.t. h only): ratio torch / jaxft wall "
              f"{best['torch frozen head'][0] / min(best[n][0] for n in frozen):.2f}, CPU time "
              f"{best['torch frozen head'][1] / min(best[n][1] for n in frozen):.2f}")
    full = [n for n, (_, ref) in cases.items() if n.startswith("jaxft") and ref == "torch"]
    print(f"ratio torch / jaxft CPU time (h and W grads): {best['torch'][1] / min(best[n][1] for n in full):.2f}")
    print(f"ratio torch / jaxft wall time (h and W grads; >1: jaxft faster): "
          f"{best['torch'][0] / min(best[n][0] for n in full):.2f}")


if __name__ == "__main__":
    main()
