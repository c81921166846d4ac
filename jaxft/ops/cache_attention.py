"""Attention of a call's new tokens over a KV cache's filled slots, read block by block with an online softmax.

Generation writes each row's keys/values at its own slot index, so rows of a batch are filled to different lengths.
A decode step must not pay for the whole cache: the key blocks are read in a `fori_loop` whose trip count is the
longest filled length among the rows that take part (a traced bound), so the work follows what was written, not the
capacity; with a sliding window, the blocks before every row's window are skipped too. The new tokens' own keys/values (and prefix tuning's) are attended directly and merged with the cached
blocks by the usual running max / running sum (FlashAttention's forward pass), so the cache need not be written
before it is read: the caller writes the new keys/values after the layer stack, in place on a donated buffer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min

# Key slots read per loop iteration (the largest power of two up to this dividing the cache length).
CACHE_BLOCK = 256


def cache_block(slots: int, block: int = CACHE_BLOCK) -> int:
    """The key block size for a cache of `slots` slots: the largest divisor of `slots` that divides `block`."""
    return math.gcd(slots, block)


def cache_attention(q_bthd: jax.Array, k_btkd: jax.Array, v_btkd: jax.Array, mask_btt: jax.Array,
                    q_segment_ids: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: jax.Array,
                    cache_segment_ids: jax.Array, cache_len: jax.Array, bound: jax.Array,
                    window: int | jax.Array | None = None, prefix_k: jax.Array | None = None,
                    prefix_v: jax.Array | None = None, block: int = CACHE_BLOCK) -> jax.Array:
    """Attention of `q[B, T, H, hd]` over (prefix keys) + (cached keys) + (this call's keys) -> `[B, T, H * hd]`.

    k, v[B, T, K, hd]: this call's keys/values; `mask_btt[B, T, T]` says which of them each query sees (causal, same
    segment, not padding, window applied). cache_k, cache_v[L, B, K, S, hd]: every layer's cache, `layer` (int32
    scalar) the one to read; `cache_segment_ids[B, S]`. Row b's query t sits at slot `cache_len[b] + t` and sees
    cached slot j when j < cache_len[b], the slot's segment id equals the query's and is not 0, and (with `window`)
    `cache_len[b] + t - j < window`. Only slots `[0, bound)` are read (rounded up to whole blocks): `bound` must
    cover `cache_len` of every row whose output matters. prefix_k, prefix_v[B, P, K, hd]: prefix tuning's keys,
    seen by every query with a non-zero segment id. Scores, softmax and the weighted sum in float32, the result
    in v's dtype.
    """
    b, t, h, hd = q_bthd.shape
    kh = k_btkd.shape[2]
    g = h // kh
    s = cache_k.shape[3]
    block = cache_block(s, block)
    scale = jnp.float32(hd ** -0.5)
    q = q_bthd.reshape(b, t, kh, g, hd)

    def scores(k_bskd, mask_bts):
        sc = jnp.einsum("btkgd,bskd->bkgts", q, k_bskd, preferred_element_type=jnp.float32) * scale
        return jnp.where(mask_bts[:, None, None], sc, _NEG)

    def cached_scores(k_bksd, mask_bts):  # the cache's layout: each head's slots contiguous, no transpose
        sc = jnp.einsum("btkgd,bksd->bkgts", q, k_bksd, preferred_element_type=jnp.float32) * scale
        return jnp.where(mask_bts[:, None, None], sc, _NEG)

    keys, values, mask = k_btkd, v_btkd, mask_btt
    if prefix_k is not None:
        visible = jnp.broadcast_to((q_segment_ids != 0)[:, :, None], (b, t, prefix_k.shape[1]))
        keys = jnp.concatenate([prefix_k.astype(k_btkd.dtype), keys], axis=1)
        values = jnp.concatenate([prefix_v.astype(v_btkd.dtype), values], axis=1)
        mask = jnp.concatenate([visible, mask], axis=2)
    sc = scores(keys, mask)
    m = jnp.max(sc, axis=-1)                                           # [B, K, G, T]
    p = jnp.exp(sc - m[..., None])
    l = jnp.sum(p, axis=-1)
    acc = jnp.einsum("bkgts,bskd->bkgtd", p, values, preferred_element_type=jnp.float32)

    q_slot = cache_len[:, None] + jnp.arange(t)[None, :]               # [B, T]

    def body(i, carry):
        m, l, acc = carry
        start = i * block
        kb = jax.lax.dynamic_slice(cache_k, (layer, 0, 0, start, 0), (1, b, kh, block, hd))[0]
        vb = jax.lax.dynamic_slice(cache_v, (layer, 0, 0, start, 0), (1, b, kh, block, hd))[0]
        seg = jax.lax.dynamic_slice(cache_segment_ids, (0, start), (b, block))
        j = start + jnp.arange(block)
        vis = ((j[None, None, :] < cache_len[:, None, None]) & (seg[:, None, :] == q_segment_ids[:, :, None])
               & (seg[:, None, :] != 0))
        if window is not None:
            vis = vis & (q_slot[:, :, None] - j[None, None, :] < window)
        sb = cached_scores(kb.astype(q.dtype), vis)
        m_new = jnp.maximum(m, jnp.max(sb, axis=-1))
        corr = jnp.exp(m - m_new)
        pb = jnp.exp(sb - m_new[..., None])
        l = l * corr + jnp.sum(pb, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bksd->bkgtd", pb, vb.astype(v_btkd.dtype),
                                                  preferred_element_type=jnp.float32)
        return m_new, l, acc

    n_blocks = (jnp.minimum(bound, s) + block - 1) // block
    first = 0
    if window is not None:  # blocks wholly before every row's window are skipped (a query sees j > its slot - window)
        first = jnp.clip((jnp.min(cache_len) - window + 1) // block, 0, n_blocks)
    m, l, acc = jax.lax.fori_loop(first, n_blocks, body, (m, l, acc))
    out = (acc / l[..., None]).astype(v_btkd.dtype)                    # [B, K, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)
