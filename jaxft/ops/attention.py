"""Grouped-query attention with segment ids (packing, padding) and explicit slot indices (KV cache).

A query attends to a key when the key's slot index is not after the query's (causal), both carry the same segment
id, and that id is not 0 (padding). Prefix keys/values (prefix tuning) are visible to every non-padding query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_index: jax.Array,
                   kv_index: jax.Array) -> jax.Array:
    """Boolean `mask[B, T, S]`: query t may read key s.

    q_segment_ids[B, T], kv_segment_ids[B, S]: segment ids (0 = padding). q_index[B, T] / kv_index[S]: slot order
    used for causality (the position in the row or in the cache, not the RoPE position).
    """
    causal = kv_index[None, None, :] <= q_index[:, :, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal & same & (kv_segment_ids[:, None, :] != 0)


def attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
              prefix_k: jax.Array | None = None, prefix_v: jax.Array | None = None,
              q_segment_ids: jax.Array | None = None) -> jax.Array:
    """Softmax attention, `q[B, T, H, hd]`, `k, v[B, S, K, hd]` with H a multiple of K -> `[B, T, H, hd]`.

    Scores and softmax are computed in float32; the weighted sum in the dtype of `v`. `prefix_k, prefix_v[B, P, K,
    hd]` are extra keys every query with a non-zero `q_segment_ids` sees.
    """
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    g = h // kh
    if prefix_k is not None:
        k_bskd = jnp.concatenate([prefix_k.astype(k_bskd.dtype), k_bskd], axis=1)
        v_bskd = jnp.concatenate([prefix_v.astype(v_bskd.dtype), v_bskd], axis=1)
        visible = jnp.broadcast_to((q_segment_ids != 0)[:, :, None], (b, t, prefix_k.shape[1]))
        mask_bts = jnp.concatenate([visible, mask_bts], axis=2)
    q = q_bthd.reshape(b, t, kh, g, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(hd ** -0.5)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskd.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_bskd)
    return out.reshape(b, t, h, hd)


def causal_block_size(t: int) -> int | None:
    """The query block size for `blocked_causal_attention` on a length-`t` row, or None to use `attention`."""
    for block in (64, 128):
        if t % block == 0 and t >= 2 * block:
            return block
    return None


def blocked_causal_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
                             block: int) -> jax.Array:
    """`attention` for a row attending to itself (S == T, slot-causal mask), computed block by block.

    Query block i reads only keys `[0, (i + 1) * block)`: the blocks above the diagonal are all masked, so skipping
    them changes nothing but the work (about half of it at long lengths). Each block is one batched GEMM per
    (batch, kv head) with the query group folded into the rows, which XLA's CPU backend runs faster than the
    five-index einsum. Same numbers as `attention` up to float32 rounding.
    """
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    g = h // kh
    k = k_bskd.transpose(0, 2, 1, 3)  # [B, K, S, hd]
    v = v_bskd.transpose(0, 2, 1, 3)
    scale = jnp.float32(hd ** -0.5)
    outs = []
    for i in range(t // block):
        lo, hi = i * block, (i + 1) * block
        q = q_bthd[:, lo:hi].reshape(b, block, kh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * block, hd)
        s = jnp.matmul(q, k[:, :, :hi].swapaxes(-1, -2), preferred_element_type=jnp.float32) * scale
        s = s.reshape(b, kh, g, block, hi)
        s = jnp.where(mask_bts[:, None, None, lo:hi, :hi], s, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype).reshape(b, kh, g * block, hi)
        o = jnp.matmul(p, v[:, :, :hi]).reshape(b, kh, g, block, hd).transpose(0, 3, 1, 2, 4)
        outs.append(o.reshape(b, block, h, hd))
    return jnp.concatenate(outs, axis=1)
