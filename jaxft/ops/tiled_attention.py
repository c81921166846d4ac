"""Causal self-attention over (query block, key block) tiles with an online softmax, forward and backward, in plain
XLA: the CPU path for long rows, where the unrolled blocks of `jaxft.ops.attention` would keep every block's scores.

An outer scan over query blocks and, inside it, a loop over the key blocks the block can see (from the first one
inside the sliding window, static or traced, to the diagonal): the causal half and the keys before the window are
never computed. Only one `[B, K, G * block, block]` tile of scores is live at a time, in the forward pass and in the
backward pass, so a layer's attention needs O(T) memory beyond q, k, v and the mask, where the unrolled blocks need
O(T^2) once XLA:CPU merges their products (measured on a Llama-2-7B layer at 2048 tokens: 3 x 276 MB live at the
backward's peak).

The backward pass is FlashAttention-2's: the forward keeps each row's softmax max and 1/sum; per tile it recomputes
p, then dq += ds k (carried per query block), dk += ds^T q and dv += p^T do (added in place into a key block of a
`[blocks, B, K, hd, block]` accumulator carried by the scan), with delta = rowsum(do o) computed once.

Numerics follow `jaxft.ops.attention`: fp32 scores and softmax, q and do scaled by 1/sqrt(hd) (`[rows, hd]`
products), masked scores set to the float32 minimum (a row that sees nothing averages the values of the keys its
loop visits; its output means nothing and its gradients are zero unless a cotangent reaches it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MIN = float(jnp.finfo(jnp.float32).min)


def _rows(x_bthd: jax.Array, kh: int, block: int) -> jax.Array:
    """`[B, T, H, d]` -> `[T / block, B, K, G * block, d]`: per query block, the group folded into the rows."""
    b, t, h, d = x_bthd.shape
    g = h // kh
    return x_bthd.reshape(b, t // block, block, kh, g, d).transpose(1, 0, 3, 4, 2, 5).reshape(
        t // block, b, kh, g * block, d)


def _unrows(x_nbkrd: jax.Array, h: int) -> jax.Array:
    """Inverse of `_rows`: `[N, B, K, G * block, d]` -> `[B, N * block, H, d]`."""
    n, b, kh, r, d = x_nbkrd.shape
    g = h // kh
    block = r // g
    return x_nbkrd.reshape(n, b, kh, g, block, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, n * block, h, d)


def _keys(x_bskd: jax.Array, block: int, transposed: bool) -> jax.Array:
    """`[B, S, K, d]` -> per key block `[N, B, K, block, d]`, or `[N, B, K, d, block]` when `transposed`."""
    b, s, kh, d = x_bskd.shape
    x = x_bskd.reshape(b, s // block, block, kh, d)
    return x.transpose(1, 0, 3, 4, 2) if transposed else x.transpose(1, 0, 3, 2, 4)


def _unkeys_transposed(x_nbkdc: jax.Array) -> jax.Array:
    """Inverse of `_keys(..., transposed=True)`: `[N, B, K, d, block]` -> `[B, N * block, K, d]`."""
    n, b, kh, d, c = x_nbkdc.shape
    return x_nbkdc.transpose(1, 0, 4, 2, 3).reshape(b, n * c, kh, d)


def _key_blocks(i, bq: int, bk: int, window):
    """`(first, stop)`: the key blocks query block `i` can see, from the one holding key `i * bq - window + 1`
    (or 0) to the one holding the block's last query (the diagonal)."""
    first = 0 if window is None else jnp.maximum(0, i * bq - window + 1) // bk
    return first, ((i + 1) * bq - 1) // bk + 1


def _tile(q_i, k_t, mask_bts, i, j, bq: int, window):
    """Masked fp32 scores of query block `i` against key block `j`, `[B, K, R, bk]`, and the keep mask."""
    b, kh, r, _ = q_i.shape
    bk = k_t.shape[-1]
    g = r // bq
    s = jnp.matmul(q_i, k_t[j], preferred_element_type=jnp.float32)
    keep = jax.lax.dynamic_slice(mask_bts, (0, i * bq, j * bk), (b, bq, bk))
    if window is not None:
        dist = i * bq - j * bk + jnp.arange(bq)[:, None] - jnp.arange(bk)[None, :]
        keep = keep & (dist < window)
    keep = jnp.broadcast_to(keep[:, None, None], (b, kh, g, bq, bk)).reshape(b, kh, r, bk)
    return jnp.where(keep, s, _MIN), keep


def scaled(x: jax.Array, scale: float | jax.Array) -> jax.Array:
    """`x * scale` rounded once to x's dtype (a bf16 copy of the scale itself would bias every score)."""
    return (x.astype(jnp.float32) * scale).astype(x.dtype)


def _forward(q_bthd, k_bskd, v_bskd, mask_bts, window, blocks):
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    bq, bk = blocks
    scale = hd ** -0.5
    q_rows = _rows(scaled(q_bthd, scale), kh, bq)
    k_t, v_blocks = _keys(k_bskd, bk, True), _keys(v_bskd, bk, False)
    r = q_rows.shape[3]

    def query_block(_, xs):
        q_i, i = xs

        def key_block(j, carry):
            acc, m, l = carry
            s, _ = _tile(q_i, k_t, mask_bts, i, j, bq, window)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
            corr = jnp.exp(m - m_new)
            e = jnp.exp(s - m_new)
            l = l * corr + jnp.sum(e, axis=-1, keepdims=True)
            acc = acc * corr + jnp.matmul(e.astype(v_bskd.dtype), v_blocks[j], preferred_element_type=jnp.float32)
            return acc, m_new, l

        init = (jnp.zeros((b, kh, r, hd), jnp.float32), jnp.full((b, kh, r, 1), _MIN, jnp.float32),
                jnp.zeros((b, kh, r, 1), jnp.float32))
        acc, m, l = jax.lax.fori_loop(*_key_blocks(i, bq, bk, window), key_block, init)
        return None, ((acc / l).astype(v_bskd.dtype), m, 1.0 / l)

    _, (o, m, inv_l) = jax.lax.scan(query_block, None, (q_rows, jnp.arange(t // bq)))
    return _unrows(o, h).reshape(b, t, h * hd), (m, inv_l)


def tiled_forward(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, blocks, static_window):
    """The tiled forward alone, `[B, T, H * hd]` (the primal of `tiled_attention`)."""
    window = static_window if traced_window is None else traced_window
    return _forward(q_bthd, k_bskd, v_bskd, mask_bts, window, blocks)[0]


tiled_attention = jax.custom_vjp(tiled_forward, nondiff_argnums=(5, 6))
tiled_attention.__doc__ = """`attention` for a row attending to itself (S == T, slot-causal `mask_bts[B, T, T]`),
tile by tile: `q[B, T, H, hd]`, `k, v[B, T, K, hd]` -> `[B, T, H * hd]`. `blocks`: (query block, key block), each
dividing T; the window is `static_window` (an int) or `traced_window` (an int32 scalar), or neither."""


def _tiled_fwd(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, blocks, static_window):
    window = static_window if traced_window is None else traced_window
    out, stats = _forward(q_bthd, k_bskd, v_bskd, mask_bts, window, blocks)
    return out, (q_bthd, k_bskd, v_bskd, mask_bts, traced_window, stats, out)


def _tiled_bwd(blocks, static_window, res, d_out):
    q_bthd, k_bskd, v_bskd, mask_bts, traced_window, (m_rows, inv_l_rows), out = res
    window = static_window if traced_window is None else traced_window
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    bq, bk = blocks
    cdt = q_bthd.dtype
    scale = hd ** -0.5
    d_out = d_out.reshape(q_bthd.shape)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.reshape(q_bthd.shape).astype(jnp.float32), axis=-1) * scale
    q_rows, do_rows = _rows(scaled(q_bthd, scale), kh, bq), _rows(scaled(d_out, scale), kh, bq)
    q_cols = _rows(q_bthd, kh, bq).swapaxes(-1, -2)  # [N, B, K, hd, R]
    do_cols = _rows(d_out, kh, bq).swapaxes(-1, -2)
    delta_rows = _rows(delta[..., None], kh, bq)  # [N, B, K, R, 1]
    k_t, k_blocks, v_t = _keys(k_bskd, bk, True), _keys(k_bskd, bk, False), _keys(v_bskd, bk, True)
    n = t // bq

    def query_block(carry, xs):
        q_i, do_i, q_col, do_col, m_i, inv_l_i, delta_i, i = xs

        def key_block(j, inner):
            dq, dk_t, dv_t = inner
            s, keep = _tile(q_i, k_t, mask_bts, i, j, bq, window)
            p = jnp.exp(s - m_i) * inv_l_i
            dp = jnp.matmul(do_i, v_t[j], preferred_element_type=jnp.float32)
            ds = jnp.where(keep, p * (dp - delta_i), 0.0).astype(cdt)  # masked scores are constants
            dq = dq + jnp.matmul(ds, k_blocks[j], preferred_element_type=jnp.float32)
            dk_t = dk_t.at[j].add(jnp.matmul(q_col, ds, preferred_element_type=jnp.float32))
            dv_t = dv_t.at[j].add(jnp.matmul(do_col, p.astype(cdt), preferred_element_type=jnp.float32))
            return dq, dk_t, dv_t

        dq = jnp.zeros(q_i.shape, jnp.float32)
        dq, dk_t, dv_t = jax.lax.fori_loop(*_key_blocks(i, bq, bk, window), key_block, (dq, *carry))
        return (dk_t, dv_t), dq.astype(cdt)

    zeros = jnp.zeros(k_t.shape, jnp.float32)
    (dk_t, dv_t), dq = jax.lax.scan(
        query_block, (zeros, zeros),
        (q_rows, do_rows, q_cols, do_cols, m_rows, inv_l_rows, delta_rows, jnp.arange(n)))
    return (_unrows(dq, h), _unkeys_transposed(dk_t).astype(k_bskd.dtype),
            _unkeys_transposed(dv_t).astype(v_bskd.dtype), None, None)


tiled_attention.defvjp(_tiled_fwd, _tiled_bwd)
