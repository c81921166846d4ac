"""Grouped-query attention with segment ids (packing, padding), explicit slot indices (KV cache) and sliding windows.

A query attends to a key when the key's slot index is not after the query's (causal), both carry the same segment
id, and that id is not 0 (padding); with a sliding window `w`, also when the key is fewer than `w` slots before the
query (transformers' `kv_idx > q_idx - sliding_window`). Segments are contiguous runs of slots, so within a segment
the slot distance is the position distance: the window counts tokens of the query's own segment, as transformers'
packed-sequence masks do, and left padding (slots before a row's first token) never falls inside it. Prefix
keys/values (prefix tuning) are visible to every non-padding query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.kernels import flash_gpu, splash_tpu
from jaxft.ops.tiled_attention import scaled, tiled_attention

# `implementation` values of `blocked_causal_attention`: "auto" picks the platform's fused kernel where it fits.
IMPLEMENTATIONS = ("auto", "xla", "splash", "flash")


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_index: jax.Array,
                   kv_index: jax.Array, window: int | jax.Array | None = None) -> jax.Array:
    """Boolean `mask[B, T, S]`: query t may read key s.

    q_segment_ids[B, T], kv_segment_ids[B, S]: segment ids (0 = padding). q_index[B, T] / kv_index[S]: slot order
    used for causality (the position in the row or in the cache, not the RoPE position). window: keys fewer than
    `window` slots before the query (None: no window).
    """
    causal = kv_index[None, None, :] <= q_index[:, :, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    mask = causal & same & (kv_segment_ids[:, None, :] != 0)
    if window is not None:
        mask = mask & (q_index[:, :, None] - kv_index[None, None, :] < window)
    return mask


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


def tiled_blocks(t: int) -> tuple[int, int] | None:
    """(query block, key block) of the tiled XLA path (`jaxft.ops.tiled_attention`) for a length-`t` row, or None
    for the unrolled blocks. Rows of 2048+ tokens take tiles: there the unrolled blocks' scores, all live at once
    under XLA:CPU, cost O(T^2) memory, and the tiles are also faster (SmolLM2 heads, fp32, forward + backward on 2
    cores, unrolled vs 256 x 512 tiles: 2048 tokens x 4 rows 703 vs 625 ms, 4096 x 4 2773 vs 2339 ms, 2048 x 1 187
    vs 187 ms; at 1024 tokens about even with 4 rows and 16% slower with 1, at 512 x 4 18-66% slower by tile shape;
    benchmarks/RESULTS.md, "attention 1x2048")."""
    if t < 2048:
        return None
    for key_block in (512, 256):
        if t % key_block == 0:
            return 256, key_block
    return None


def attention_platform() -> str:
    """The platform attention is lowered for: the abstract device of the current abstract mesh when one is set
    (`jax.sharding.use_abstract_mesh(AbstractMesh(..., abstract_device=AbstractDevice(platform="tpu")))` exports a
    TPU step from this CPU; jit's cache keys on it), else `jax.default_backend()`: "cpu", "gpu" or "tpu"."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    platform = device.platform if device is not None else jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def choose_implementation(implementation: str, t: int, head_dim: int, window: int | jax.Array | None) -> str:
    """The attention path for a length-`t` self-attention: "xla" (blocked attention here), "splash" (TPU) or
    "flash" (GPU, Triton). "auto" takes the platform's kernel when the shapes fit it (splash: `t` a multiple of
    128 and a static window; flash: `t` a multiple of 128, head_dim a power of two) and XLA otherwise; a named kernel
    is taken as asked (its shape checks raise), on another platform in Pallas interpret mode (slow: for tests)."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"attention implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    platform = attention_platform()
    if platform == "tpu" and splash_tpu.supported(t) and (window is None or isinstance(window, int)):
        return "splash"
    if platform == "gpu" and flash_gpu.supported(t, head_dim):
        return "flash"
    return "xla"


def segments_from_mask(mask_bts: jax.Array) -> jax.Array:
    """Segment ids `[B, T]` equivalent to a self-attention `attention_mask` (no window): each slot labelled by its
    segment's first slot + 1 (the first key it sees, a query always seeing itself), 0 where it sees nothing
    (padding). For callers that hold only the mask; passing the segment ids skips this `[B, T, T]` pass."""
    first = jnp.argmax(mask_bts, axis=2).astype(jnp.int32)
    sees_itself = jnp.diagonal(mask_bts, axis1=1, axis2=2)
    return jnp.where(sees_itself, first + 1, 0)


def blocked_causal_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, mask_bts: jax.Array,
                             block: int, merge_heads: bool = False,
                             window: int | jax.Array | None = None, segment_ids: jax.Array | None = None,
                             implementation: str = "auto") -> jax.Array:
    """`attention` for a row attending to itself (S == T, slot-causal mask), computed block by block.

    On accelerators the same attention runs as the platform's fused kernel (`choose_implementation`): splash
    attention on TPU, jaxft's Triton flash attention on GPU, both from `segment_ids[B, T]` (derived from the mask by
    `segments_from_mask` when not given) with the causal mask and `window` built in; `mask_bts` is then not read.
    Outputs of padding rows (segment 0) differ between the paths (they mean nothing); real rows agree.

    Rows of 2048+ tokens (`tiled_blocks`) run as a loop over tiles with an online softmax
    (`jaxft.ops.tiled_attention`, O(T) memory); shorter ones as unrolled query blocks: block i reads only keys
    `[0, (i + 1) * block)`: the blocks above the diagonal are all masked, so skipping them changes nothing but the
    work (about half of it at long lengths). Each block is one batched GEMM per
    (batch, kv head) with the query group folded into the rows, which XLA's CPU backend runs faster than the
    five-index einsum. Same numbers as `attention` up to float32 rounding.

    `window`: the sliding window, applied on top of `mask_bts` (which need not carry it). A Python int also skips
    the key blocks the window hides from a whole query block (keys before `lo - window + 1` for rows from `lo`), so
    the work grows with `T * window` rather than `T^2`; a traced scalar (one window per layer under a scan over
    layers with different windows) only masks.

    A custom VJP in the manner of FlashAttention's backward pass: the forward pass keeps only q, k, v, the output
    and each row's softmax max and sum; the backward pass recomputes each block's probabilities from them, so no
    O(T^2) scores, mask or probabilities per layer and head are kept for the backward pass.

    `merge_heads=True` returns `[B, T, H * hd]`, the array the backward pass keeps. A caller that feeds it to a
    layer keeping its input (a LoRA o projection) then keeps one array per layer instead of two under a scan.
    """
    b, t, h, hd = q_bthd.shape
    chosen = choose_implementation(implementation, t, hd, window)
    if chosen != "xla":
        segments = segments_from_mask(mask_bts) if segment_ids is None else segment_ids
        if chosen == "splash":
            out = splash_tpu.splash_attention(q_bthd, k_bskd, v_bskd, segments, window=window,
                                              interpret=attention_platform() != "tpu")
        else:
            out = flash_gpu.flash_attention(q_bthd, k_bskd, v_bskd, segments, window=window,
                                            interpret=attention_platform() != "gpu")
        return out.reshape(b, t, h * hd) if merge_heads else out
    static = window if isinstance(window, int) else None
    traced = None if window is None or static is not None else jnp.asarray(window, jnp.int32)
    tiles = tiled_blocks(t)
    if tiles is not None:
        out = tiled_attention(q_bthd, k_bskd, v_bskd, mask_bts, traced, tiles, static)
    else:
        out = _blocked(q_bthd, k_bskd, v_bskd, mask_bts, traced, block, static)
    return out if merge_heads else out.reshape(q_bthd.shape)


def _key_start(lo: int, block: int, static_window: int | None) -> int:
    """First key slot query rows `[lo, ...)` can see under a static window, rounded down to a block boundary."""
    if static_window is None:
        return 0
    return max(0, lo - static_window + 1) // block * block


def _block_mask(mask_bts, lo, hi, klo, traced_window, static_window):
    """`mask[B, 1, 1, hi - lo, hi - klo]` of query rows `[lo, hi)` against keys `[klo, hi)`, window applied."""
    m = mask_bts[:, None, None, lo:hi, klo:hi]
    window = static_window if traced_window is None else traced_window
    if window is None:
        return m
    dist = jnp.arange(lo, hi)[:, None] - jnp.arange(klo, hi)[None, :]
    return m & (dist < window)


def _heads_major(q_bthd: jax.Array, kh: int, lo: int, hi: int) -> jax.Array:
    """Query rows `[lo, hi)` of `q[B, T, H, hd]` as `[B, K, G * (hi - lo), hd]` (the group folded into rows)."""
    b, _, h, hd = q_bthd.shape
    g = h // kh
    return q_bthd[:, lo:hi].reshape(b, hi - lo, kh, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * (hi - lo), hd)


def _tokens_major(x_bkrd: jax.Array, h: int) -> jax.Array:
    """Inverse of `_heads_major` for one block: `[B, K, G * n, hd]` -> `[B, n, H, hd]`."""
    b, kh, rows, hd = x_bkrd.shape
    g = h // kh
    n = rows // g
    return x_bkrd.reshape(b, kh, g, n, hd).transpose(0, 3, 1, 2, 4).reshape(b, n, h, hd)


def _layout_barrier(x: jax.Array) -> jax.Array:
    """`x` laid out as written: an optimisation barrier that stops XLA from folding a transpose into the dot that
    reads it. On CPU a dot contracting an operand's last axis against the other's last axis (q k^T), or two
    leading axes (ds^T q), is slower than the plain [M, K] @ [K, N] layout, while the explicit transpose of a small
    operand costs next to nothing."""
    return jax.lax.optimization_barrier(x)


def _block_scores(q_bkrd, k_bkds, keep, lo, hi, klo, g):
    """Masked fp32 scores of query rows `[lo, hi)` against keys `[klo, hi)`: `[B, K, G, hi - lo, hi - klo]`.

    q[B, K, G * (hi - lo), hd] already multiplied by the softmax scale (a `[rows, hd]` product instead of a
    `[rows, keys]` one), k transposed `[B, K, hd, S]`, keep from `_block_mask`."""
    b, kh, _, _ = q_bkrd.shape
    s = jnp.matmul(q_bkrd, k_bkds[..., klo:hi], preferred_element_type=jnp.float32)
    s = s.reshape(b, kh, g, hi - lo, hi - klo)
    return jnp.where(keep, s, jnp.finfo(jnp.float32).min)


def _blocked_fwd_impl(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, block, static_window):
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    g = h // kh
    k_t = _layout_barrier(k_bskd.transpose(0, 2, 3, 1))  # [B, K, hd, S]
    v = v_bskd.transpose(0, 2, 1, 3)  # [B, K, S, hd]
    scale = jnp.float32(hd ** -0.5)
    outs, stats = [], []
    for i in range(t // block):
        lo, hi = i * block, (i + 1) * block
        klo = _key_start(lo, block, static_window)
        keep = _block_mask(mask_bts, lo, hi, klo, traced_window, static_window)
        s = _block_scores(scaled(_heads_major(q_bthd, kh, lo, hi), scale), k_t, keep, lo, hi, klo, g)
        row_max = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - row_max)
        row_sum = jnp.sum(e, axis=-1, keepdims=True)  # [B, K, G, n, 1]
        o = jnp.matmul(e.astype(v.dtype).reshape(b, kh, g * block, hi - klo), v[:, :, klo:hi],
                       preferred_element_type=jnp.float32)
        o = o / row_sum.reshape(b, kh, g * block, 1)
        outs.append(_tokens_major(o.astype(v.dtype), h))
        # The max and 1/sum, not their log-sum-exp: on a fully masked row max + log(sum) rounds back to max.
        stats.append((row_max.reshape(b, kh, g * block, 1), (1.0 / row_sum).reshape(b, kh, g * block, 1)))
    return jnp.concatenate(outs, axis=1).reshape(b, t, h * hd), stats


def blocked_forward(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, block, static_window):
    """The blocked forward alone, `[B, T, H * hd]`: the primal of `blocked_causal_attention`'s custom VJP (plain
    autodiff of it is the reference the hand-written backward pass is measured against)."""
    return _blocked_fwd_impl(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, block, static_window)[0]


_blocked = jax.custom_vjp(blocked_forward, nondiff_argnums=(5, 6))


def _blocked_fwd(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, block, static_window):
    out, stats = _blocked_fwd_impl(q_bthd, k_bskd, v_bskd, mask_bts, traced_window, block, static_window)
    return out, (q_bthd, k_bskd, v_bskd, mask_bts, traced_window, stats, out)


def _blocked_bwd(block, static_window, res, d_out):
    """Per query block: p = softmax (recomputed), dp = do v^T, dv += p^T do, ds = p (dp - delta), dq = ds k,
    dk += ds^T q, with FlashAttention's delta = rowsum(do o) computed once for all rows (o = p v, so it equals
    rowsum(p dp) at a `[rows, hd]` cost instead of `[rows, keys]`). The output o kept for it is the array the
    forward pass returns, so under a scan a caller keeping it too (the o projection's LoRA) shares one stack. The
    softmax scale is applied to q and do (`[rows, hd]`), not to the scores. The key/value gradients are accumulated
    transposed, `[B, K, hd, S]`, so every product is a plain [M, K] @ [K, N] (see `_layout_barrier`).

    Each block's dk, dv are added in place into their key columns `[klo, hi)` and each block's dq written into its
    rows: summing zero-padded blocks (or concatenating them) lets XLA fuse all the blocks into the RoPE backward
    that reads the result, a loop gathering one strided input per block for every element."""
    q_bthd, k_bskd, v_bskd, mask_bts, traced_window, stats, out_btf = res
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    g = h // kh
    cdt = q_bthd.dtype
    k = k_bskd.transpose(0, 2, 1, 3)  # [B, K, S, hd]
    k_t = _layout_barrier(k_bskd.transpose(0, 2, 3, 1))  # [B, K, hd, S]
    v_t = _layout_barrier(v_bskd.transpose(0, 2, 3, 1))
    scale = jnp.float32(hd ** -0.5)
    d_out = d_out.reshape(q_bthd.shape)
    # delta, pre-scaled like dp below: [B, T, H].
    out = out_btf.reshape(q_bthd.shape)
    delta_bth = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) * scale
    dk_t = jnp.zeros((b, kh, hd, t), jnp.float32)
    dv_t = jnp.zeros((b, kh, hd, t), jnp.float32)
    dq = jnp.zeros(q_bthd.shape, cdt)
    for i in range(t // block):
        lo, hi = i * block, (i + 1) * block
        klo = _key_start(lo, block, static_window)
        n_keys = hi - klo
        q = _heads_major(q_bthd, kh, lo, hi)  # [B, K, R, hd], R = G * block
        do = _heads_major(d_out, kh, lo, hi)
        q_t, do_t = _layout_barrier((q.swapaxes(-1, -2), do.swapaxes(-1, -2)))  # [B, K, hd, R]
        block_keep = _block_mask(mask_bts, lo, hi, klo, traced_window, static_window)
        s = _block_scores(scaled(q, scale), k_t, block_keep, lo, hi, klo, g).reshape(b, kh, g * block, n_keys)
        row_max, inv_sum = stats[i]
        p = jnp.exp(s - row_max) * inv_sum  # softmax, [B, K, R, n_keys]
        dp = jnp.matmul(scaled(do, scale), v_t[..., klo:hi], preferred_element_type=jnp.float32)
        delta = _heads_major(delta_bth[..., None], kh, lo, hi)  # [B, K, R, 1]
        # Masked scores are constants: no gradient (matters only for fully masked rows, where p is uniform). The
        # select is its own pass rather than left to the fused product (faster on CPU).
        keep = jnp.broadcast_to(block_keep, (b, kh, g, block, n_keys)).reshape(s.shape)
        ds = jnp.where(keep, p * (dp - delta), 0.0).astype(cdt)
        dq = dq.at[:, lo:hi].set(_tokens_major(jnp.matmul(ds, k[:, :, klo:hi], preferred_element_type=jnp.float32)
                                               .astype(cdt), h))
        dk_t = dk_t.at[..., klo:hi].add(jnp.matmul(q_t, ds, preferred_element_type=jnp.float32))
        dv_t = dv_t.at[..., klo:hi].add(jnp.matmul(do_t, p.astype(cdt), preferred_element_type=jnp.float32))
    dk = dk_t.transpose(0, 3, 1, 2).astype(k_bskd.dtype)
    dv = dv_t.transpose(0, 3, 1, 2).astype(v_bskd.dtype)
    return dq, dk, dv, None, None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
