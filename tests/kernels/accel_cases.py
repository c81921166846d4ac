"""Inputs and the oracle for the fused attention kernels' tests: packed rows with ragged segments, left and right
padding, grouped KV heads; the oracle is jaxft's blocked XLA attention (itself tested against transformers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.ops.attention import attention_mask, blocked_causal_attention


def ragged_segments(rng: np.random.RandomState, b: int, t: int) -> np.ndarray:
    """`[b, t]` int32 segment ids: row 0 left-padded, the others right-padded, 1-4 segments of random lengths
    (some shorter than a block, some crossing block boundaries); ids need not be consecutive."""
    seg = np.zeros((b, t), np.int32)
    for row in range(b):
        pad = rng.randint(1, t // 4)
        n = rng.randint(1, 5)
        cuts = np.sort(rng.choice(np.arange(1, t - pad), size=n - 1, replace=False)) if n > 1 else np.zeros(0, int)
        ids = np.repeat(rng.permutation(np.arange(1, 10))[:n], np.diff(np.concatenate([[0], cuts, [t - pad]]).astype(int)))
        seg[row] = np.concatenate([np.zeros(pad, np.int32), ids]) if row == 0 else np.concatenate(
            [ids, np.zeros(pad, np.int32)])
    return seg


def make_case(seed: int, b: int, t: int, h: int, k: int, hd: int, dtype=jnp.float32):
    """q[b, t, h, hd], k, v[b, t, k, hd], segment ids and an output cotangent that is 0 on padding rows (whose
    outputs mean nothing on any path)."""
    rng = np.random.RandomState(seed)
    q, kk, v = (jnp.asarray(rng.randn(b, t, n, hd).astype(np.float32), dtype) for n in (h, k, k))
    seg = jnp.asarray(ragged_segments(rng, b, t))
    d_out = jnp.asarray(rng.randn(b, t, h, hd).astype(np.float32)) * (seg != 0)[:, :, None, None]
    return q, kk, v, seg, d_out.astype(dtype)


def oracle(q, k, v, seg, window, block: int = 16):
    """The blocked XLA attention with `attention_mask`'s mask: `[B, T, H, hd]`."""
    b, t = seg.shape
    mask = attention_mask(seg, seg, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.arange(t))
    return blocked_causal_attention(q, k, v, mask, block, window=window, implementation="xla")


def errors(fused, q, k, v, seg, d_out, window) -> tuple[float, float]:
    """(forward, gradient) errors of `fused(q, k, v, seg, window)` against the oracle: max |diff| over real rows
    (forward) or over dq, dk, dv, each divided by max(1, the oracle's max |value|) (inputs are O(1); with a window
    of 1 dq and dk are exactly 0)."""
    real = (seg != 0)[:, :, None, None]
    out_f, vjp_f = jax.vjp(lambda a, b_, c: fused(a, b_, c, seg, window), q, k, v)
    out_o, vjp_o = jax.vjp(lambda a, b_, c: oracle(a, b_, c, seg, window), q, k, v)
    fwd = float(jnp.max(jnp.abs(jnp.where(real, out_f - out_o, 0))) / jnp.maximum(1.0, jnp.max(jnp.abs(out_o))))
    grads = [float(jnp.max(jnp.abs(a - o)) / jnp.maximum(1.0, jnp.max(jnp.abs(o)))) for a, o in zip(vjp_f(d_out), vjp_o(d_out))]
    return fwd, max(grads)
