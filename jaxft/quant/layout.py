"""NF4Tensor's packing order (see `jaxft.quant.nf4`): rows of `in` in chunks of 256; byte `j` of a chunk of width
`c` holds row `j` in its high nibble and row `j + c/2` in its low nibble."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 256  # rows of `in` packed together (two halves of 128: lane-aligned slices of x on TPU)


def _chunks(k: int) -> list[tuple[int, int]]:
    """`(start, width)` of the packing chunks of `k` rows."""
    return [(s, min(CHUNK, k - s)) for s in range(0, k, CHUNK)]


def pack(q: jax.Array) -> jax.Array:
    """Codes `[..., in, out]` (0..15) -> packed uint8 `[..., in/2, out]` in NF4Tensor's chunk order."""
    parts = []
    for s, c in _chunks(q.shape[-2]):
        hi, lo = q[..., s: s + c // 2, :], q[..., s + c // 2: s + c, :]
        parts.append(((hi.astype(jnp.uint8) << 4) | lo.astype(jnp.uint8)).astype(jnp.uint8))
    return jnp.concatenate(parts, axis=-2)


def unpack(codes: jax.Array, dtype=jnp.int32) -> jax.Array:
    """Packed uint8 `[..., in/2, out]` -> codes `[..., in, out]` in `dtype` (inverse of `pack`).

    Row r of the result reads byte row `rows[r]` shifted by `shifts[r]` (4: high nibble, 0: low), both constants of
    the packing order, so XLA fuses the unpacking into whatever reads the codes instead of writing them out (a
    concatenation of per-chunk slices did not fuse)."""
    rows, shifts = [], []
    for s, c in _chunks(2 * codes.shape[-2]):
        j = np.arange(c)
        rows.append(s // 2 + j % (c // 2))
        shifts.append(np.where(j < c // 2, 4, 0))
    rows, shifts = np.concatenate(rows), np.concatenate(shifts).astype(np.uint8)
    b = jnp.take(codes, jnp.asarray(rows, jnp.int32), axis=-2)
    return ((b >> shifts[:, None]) & 15).astype(dtype)
