"""Flash attention for GPUs as a Pallas Triton kernel: packed segments, causal mask, sliding window, grouped heads.

`flash_attention(q, k, v, segment_ids, window=)` computes what `jaxft.ops.attention.attention` computes with the
mask `attention_mask(segment_ids, segment_ids, arange(T), arange(T), window)` (a query reads a key when the key is
not after it, both carry the same non-zero segment id, and the key is fewer than `window` slots before it), without
ever holding a `[T, T]` array: each program keeps one query (or key) block in registers and streams the other side
through an online softmax (FlashAttention-2). The backward pass recomputes the probabilities from the saved
log-sum-exp.

Why our own kernel rather than cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`) or jax's
`pallas.ops.gpu.attention.mha`: cuDNN's public jax API has no segment ids (packing only through private offsets, on
Hopper only) and cannot be lowered without a GPU, so nothing about it could be tested here; jax's Pallas kernel has
segment ids but no sliding window and no grouped KV heads, and it is deprecated in jax 0.12. This kernel lowers to
Triton on a machine without a GPU (`jax.export`), and runs on CPU with `interpret=True` for the tests.

Grouped-query attention reads KV head `h // G` for query head `h` through the block index maps (no copy of K, V per
query head); the key/value gradient kernel writes one gradient per query head, `[B, S, H, hd]` float32, which XLA
sums over each group afterwards (Triton blocks are powers of two, and a group of 3 or 5 heads is not).

Rows no key is visible to (padding, segment id 0) get an output of no meaning and no gradient, as in the oracle a
loss mask ignores them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxft.errors import UnsupportedConfigError

# A finite "minus infinity": a fully masked block then yields exp(0) = 1 terms that the next visible key's correction
# factor exp(MASK - s) wipes out, instead of the NaN of (-inf) - (-inf).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# The window of a call without one: beyond any sequence length (kept as an int32 kernel input).
NO_WINDOW = 2 ** 30


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    """Tile sizes (powers of two, >= 16 for Triton's dots) and launch parameters.

    q, kv: the forward kernel's query and key blocks; q_bwd, kv_bwd: the backward kernels'. The sequence length
    must be a multiple of every one of them.
    """

    q: int = 128
    kv: int = 64
    q_bwd: int = 64
    kv_bwd: int = 64
    num_warps: int | None = None
    num_stages: int = 2

    def largest(self) -> int:
        return max(self.q, self.kv, self.q_bwd, self.kv_bwd)


def supported(t: int, head_dim: int, blocks: FlashBlocks = FlashBlocks()) -> bool:
    """Whether a length-`t` row with heads of `head_dim` fits the kernel's tiling (else use the XLA path)."""
    pow2 = head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return pow2 and head_dim <= 256 and t % blocks.largest() == 0


def _visible(q_pos, k_pos, q_seg, k_seg, window):
    """`[bq, bk]` bool: causal, same non-zero segment, fewer than `window` slots back (transformers' window)."""
    dist = q_pos[:, None] - k_pos[None, :]
    same = (q_seg[:, None] == k_seg[None, :]) & (k_seg[None, :] != 0)
    return (dist >= 0) & (dist < window) & same


def _first_key_block(q_lo, block_kv, static_window):
    """First key block a query block starting at slot `q_lo` can see (0 unless a static window hides some)."""
    if static_window is None:
        return 0
    return lax.div(jnp.maximum(q_lo - (static_window - 1), 0), block_kv)


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, w_ref, o_ref, lse_ref, *, scale, block_q, block_kv, static_window):
    """One query block of one head: o = softmax(q k^T * scale, masked) v and the rows' log-sum-exp."""
    i = pl.program_id(0)
    q = q_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]
    window = w_ref[0]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        keys = pl.ds(j * block_kv, block_kv)
        s = plgpu.dot(q, k_ref[keys, :], trans_b=True) * scale
        keep = _visible(q_pos, j * block_kv + jnp.arange(block_kv), q_seg, seg_ref[keys], window)
        s = jnp.where(keep, s, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next[:, None])
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        v = v_ref[keys, :]
        acc = correction[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    head_dim = q.shape[-1]
    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    lo = _first_key_block(i * block_q, block_kv, static_window)
    hi = lax.div((i + 1) * block_q + block_kv - 1, block_kv)  # causal: no key block after the query block
    acc, m, l = lax.fori_loop(lo, hi, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, w_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale, block_q, block_kv,
               static_window):
    """One query block: dq = scale * sum_j ds_j k_j with ds = p (do v^T - delta)."""
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]
    window = w_ref[0]

    def body(j, dq):
        keys = pl.ds(j * block_kv, block_kv)
        k, v = k_ref[keys, :], v_ref[keys, :]
        s = plgpu.dot(q, k, trans_b=True) * scale
        keep = _visible(q_pos, j * block_kv + jnp.arange(block_kv), q_seg, seg_ref[keys], window)
        p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    lo = _first_key_block(i * block_q, block_kv, static_window)
    hi = lax.div((i + 1) * block_q + block_kv - 1, block_kv)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, w_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, scale, block_q,
                block_kv, static_window, n_q_blocks):
    """One key block against one query head: dv = sum_i p_i^T do_i, dk = scale * sum_i ds_i^T q_i."""
    j = pl.program_id(0)
    keys = pl.ds(j * block_kv, block_kv)
    k, v = k_ref[...], v_ref[...]
    k_pos = j * block_kv + jnp.arange(block_kv)
    k_seg = seg_ref[keys]
    window = w_ref[0]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        s = plgpu.dot(q, k, trans_b=True) * scale
        keep = _visible(i * block_q + jnp.arange(block_q), k_pos, seg_ref[rows], k_seg, window)
        p = jnp.where(keep, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta_ref[rows][:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo = lax.div(j * block_kv, block_q)  # causal: no query block before the key block
    hi = n_q_blocks
    if static_window is not None:  # queries at most window - 1 slots after the block's last key
        hi = jnp.minimum(n_q_blocks, lax.div(j * block_kv + block_kv + static_window - 2, block_q) + 1)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = dk * scale
    dv_ref[...] = dv


def _params(blocks: FlashBlocks, head_dim: int) -> plgpu.CompilerParams:
    num_warps = blocks.num_warps if blocks.num_warps is not None else (4 if head_dim <= 64 else 8)
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=blocks.num_stages)


def _forward(q, k, v, seg, w, blocks, static_window, interpret):
    b, t, h, hd = q.shape
    g = h // k.shape[2]
    bq, bk = blocks.q, blocks.kv
    kernel = functools.partial(_forward_kernel, scale=hd ** -0.5, block_q=bq, block_kv=bk,
                               static_window=static_window)
    rows = pl.BlockSpec((None, bq, None, hd), lambda i, bi, hi: (bi, i, hi, 0))
    whole_kv = pl.BlockSpec((None, t, None, hd), lambda i, bi, hi: (bi, 0, hi // g, 0))
    return pl.pallas_call(
        kernel, grid=(t // bq, b, h),
        in_specs=[rows, whole_kv, whole_kv, pl.BlockSpec((None, t), lambda i, bi, hi: (bi, 0)),
                  pl.BlockSpec((1,), lambda i, bi, hi: (0,))],
        out_specs=[rows, pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(blocks, hd), interpret=interpret, name="jaxft_flash_forward",
    )(q, k, v, seg, w)


def _backward(q, k, v, seg, w, out, lse, d_out, blocks, static_window, interpret):
    b, t, h, hd = q.shape
    kh = k.shape[2]
    g = h // kh
    scale = hd ** -0.5
    # FlashAttention's delta = rowsum(do * o) (= rowsum(p * dp)), once for all rows: [B, H, T].
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    bq, bk = blocks.q_bwd, blocks.kv_bwd
    seg_spec = pl.BlockSpec((None, t), lambda x, bi, hi: (bi, 0))
    w_spec = pl.BlockSpec((1,), lambda x, bi, hi: (0,))
    q_rows = pl.BlockSpec((None, bq, None, hd), lambda i, bi, hi: (bi, i, hi, 0))
    whole_kv = pl.BlockSpec((None, t, None, hd), lambda i, bi, hi: (bi, 0, hi // g, 0))
    row_stats = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_q=bq, block_kv=bk, static_window=static_window),
        grid=(t // bq, b, h),
        in_specs=[q_rows, whole_kv, whole_kv, seg_spec, w_spec, q_rows, row_stats, row_stats],
        out_specs=q_rows, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(blocks, hd), interpret=interpret, name="jaxft_flash_dq",
    )(q, k, v, seg, w, d_out, lse, delta)
    whole_q = pl.BlockSpec((None, t, None, hd), lambda j, bi, hi: (bi, 0, hi, 0))
    kv_rows = pl.BlockSpec((None, bk, None, hd), lambda j, bi, hi: (bi, j, hi // g, 0))
    per_head = pl.BlockSpec((None, bk, None, hd), lambda j, bi, hi: (bi, j, hi, 0))
    whole_stats = pl.BlockSpec((None, None, t), lambda j, bi, hi: (bi, hi, 0))
    dk_h, dv_h = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, block_kv=bk, static_window=static_window,
                          n_q_blocks=t // bq),
        grid=(t // bk, b, h),
        in_specs=[whole_q, kv_rows, kv_rows, seg_spec, w_spec, whole_q, whole_stats, whole_stats],
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
        compiler_params=_params(blocks, hd), interpret=interpret, name="jaxft_flash_dkv",
    )(q, k, v, seg, w, d_out, lse, delta)
    dk = dk_h.reshape(b, t, kh, g, hd).sum(axis=3).astype(k.dtype)
    dv = dv_h.reshape(b, t, kh, g, hd).sum(axis=3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, seg, w, blocks, static_window, interpret):
    return _forward(q, k, v, seg, w, blocks, static_window, interpret)[0]


def _flash_fwd(q, k, v, seg, w, blocks, static_window, interpret):
    out, lse = _forward(q, k, v, seg, w, blocks, static_window, interpret)
    return out, (q, k, v, seg, w, out, lse)


def _flash_bwd(blocks, static_window, interpret, res, d_out):
    q, k, v, seg, w, out, lse = res
    dq, dk, dv = _backward(q, k, v, seg, w, out, lse, d_out, blocks, static_window, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, segment_ids_bt: jax.Array, *,
                    window: int | jax.Array | None = None, blocks: FlashBlocks = FlashBlocks(),
                    interpret: bool = False) -> jax.Array:
    """Causal self-attention of packed rows, `q[B, T, H, hd]`, `k, v[B, T, K, hd]` (H a multiple of K) ->
    `[B, T, H, hd]` in q's dtype; scores, softmax and accumulation in float32, softmax scale `hd ** -0.5`.

    segment_ids_bt[B, T]: int32, 0 = padding. window: the sliding window (keys fewer than `window` slots before the
    query); a Python int also skips the key blocks it hides, a traced scalar (one window per layer under a scan)
    only masks. Differentiable in q, k, v (custom VJP, two Triton kernels: dq per query block, dk/dv per key block).
    `interpret=True` runs the kernels on any backend (the CPU tests).
    """
    b, t, h, hd = q_bthd.shape
    if k_bskd.shape[1] != t or h % k_bskd.shape[2] or not supported(t, hd, blocks):
        raise UnsupportedConfigError(
            f"flash_attention: q {q_bthd.shape}, k {k_bskd.shape} do not fit the kernel (self-attention, heads a "
            f"multiple of the KV heads, head_dim a power of two in [16, 256], length a multiple of "
            f"{blocks.largest()}); use the XLA path (model.attention: xla)")
    static_window = window if isinstance(window, int) else None
    w = jnp.full((1,), NO_WINDOW if window is None else window, jnp.int32)
    return _flash(q_bthd, k_bskd, v_bskd, segment_ids_bt.astype(jnp.int32), w, blocks, static_window, interpret)
