"""Causal attention forward + backward: jaxft's blocked attention vs torch's scaled_dot_product_attention, CPU fp32.

One layer of SmolLM2-135M (9 query heads, 3 kv heads, head dim 64), batch 4 x 512 by default. Also times the same
blocked forward differentiated by plain autodiff, to show what the hand-written backward buys, and at 2048+ tokens,
where the model takes the tiled path (`jaxft.ops.tiled_attention`), the unrolled blocks it replaces. A run at
another shape is recorded under its own heading (`attention 1x2048`). One process with
freed host memory kept mapped for both sides (`jaxft.runtime.keep_freed_host_memory`, as `python -m jaxft.train`
runs); jaxft's forward and backward are separate jits, as under the model's scan over layers, where the backward
cannot reuse the forward's work. Prints the ratio last (> 1 means jaxft is faster).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import numpy as np

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_here, os.path.dirname(_here)]
from common import report, timeit  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    from jaxft.runtime import keep_freed_host_memory

    keep_freed_host_memory()  # before JAX and torch start their threads
    import jax
    import jax.numpy as jnp
    import torch

    A = importlib.import_module("jaxft.ops.attention")  # the module (jaxft.ops re-exports a function by that name)

    b, t, h, kh, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    block = A.causal_block_size(t)
    if block is None:
        raise SystemExit(f"attention.py: --seq {t} does not use the blocked path (needs a multiple of 64, >= 128)")
    rng = np.random.RandomState(0)
    q, k, v, g = (rng.randn(b, t, n, d).astype(np.float32) for n in (h, kh, kh, h))
    seg = jnp.ones((b, t), jnp.int32)
    mask = A.attention_mask(seg, seg, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.arange(t))
    args_j = [jnp.asarray(x) for x in (q, k, v, g)]

    def fwd_bwd(attn):
        fwd = jax.jit(lambda q_, k_, v_: jax.vjp(lambda a, b_, c: attn(a, b_, c, mask, block), q_, k_, v_))
        bwd = jax.jit(lambda vjp, g_: vjp(g_))

        def f(q_, k_, v_, g_):
            out, vjp = fwd(q_, k_, v_)
            return out, bwd(vjp, g_)
        return f

    tiles = A.tiled_blocks(t)
    custom = fwd_bwd(A.blocked_causal_attention)
    autodiff = fwd_bwd(lambda q_, k_, v_, m, blk: A.blocked_forward(q_, k_, v_, m, None, blk, None).reshape(q_.shape))
    unrolled = fwd_bwd(lambda q_, k_, v_, m, blk: A._blocked(q_, k_, v_, m, None, blk, None).reshape(q_.shape))
    jax_s = timeit(lambda: jax.block_until_ready(custom(*args_j)), repeat=args.repeat)
    auto_s = timeit(lambda: jax.block_until_ready(autodiff(*args_j)), repeat=args.repeat)
    unrolled_s = timeit(lambda: jax.block_until_ready(unrolled(*args_j)), repeat=args.repeat) if tiles else None

    tq, tk, tv = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    tg = torch.tensor(g).transpose(1, 2).contiguous()

    def torch_step():
        out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        out.backward(tg)
        for x in (tq, tk, tv):
            x.grad = None

    torch_s = timeit(torch_step, repeat=args.repeat)
    ratio = torch_s / jax_s
    lines = ["| side | ms (fwd + bwd) |", "|---|---|",
             f"| jaxft {f'tiled {tiles[0]} x {tiles[1]}' if tiles else 'blocked'}, hand-written backward (jit) | "
             f"{jax_s * 1e3:.1f} |",
             *([f"| jaxft unrolled blocks, hand-written backward (jit) | {unrolled_s * 1e3:.1f} |"] if tiles else []),
             f"| jaxft unrolled blocks, autodiff backward (jit) | {auto_s * 1e3:.1f} |",
             f"| torch scaled_dot_product_attention (is_causal) | {torch_s * 1e3:.1f} |", "",
             f"batch {b} x {t}, {h} heads / {kh} kv heads, head dim {d}, fp32, block {block}; torch threads "
             f"{torch.get_num_threads()}.", "", f"**ratio jaxft / torch: {ratio:.2f}x**"]
    default = (b, t, h, kh, d) == (4, 512, 9, 3, 64)
    report("attention" if default else f"attention {b}x{t}", lines, ratio, record_it=not args.no_record,
           command=None if default else f"python benchmarks/attention.py {' '.join(argv or sys.argv[1:])}")


if __name__ == "__main__":
    main()
