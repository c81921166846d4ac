"""Chunked cross-entropy for causal LM training, without `[tokens, vocab]` fp32 logits in memory at once.

`cross_entropy_sum` returns the SUM of token losses and the number of loss tokens, so a trainer that accumulates
micro-batches divides once by the loss-token count of the whole step (not a mean of micro-batch means).

Two paths, chosen by the type of the head weight:

- plain array `head_w[D, V]` (or a tied head's `[V, D]` embedding table with `transposed=True`): a `custom_vjp`.
  Per chunk of tokens it computes the logits, the fp32 log-sum-exp and, when differentiating, the logit gradient
  `G = mask * (softmax - onehot)` right away, with `dh = G @ W.T` and `dW += h.T @ G`. That is three matmuls per
  chunk (as autodiff) but one pass of `exp`, no recomputation, and no scatter: the one-hot term is a fused
  comparison with an iota. Only the gradients asked for are computed
  (`symbolic_zeros`: a frozen head, as in LoRA, costs no `dW` matmul).
- composite `Weight` (LoRA on the head, ...): plain autodiff through `linear`, with each chunk rematerialised
  (`jax.checkpoint`) so the backward pass also holds one chunk of logits at a time.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxft.ops.linear import Weight, linear

DEFAULT_CHUNK_SIZE = 512


def cross_entropy_sum(
    hidden: jax.Array,
    head_w: Any,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logits_dtype: Any = jnp.float32,
    transposed: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token cross-entropies over masked tokens, computed chunk by chunk.

    Args:
      hidden: `[N, D]` final hidden states (after the final norm), compute dtype (bf16 or fp32).
      head_w: the lm_head weight `[D, V]`: a plain array or a composite `Weight`; with `transposed`, a plain
        `[V, D]` array whose transpose is the head (tied embeddings: pass the embedding table itself).
      targets: `[N]` int target ids; entries where `mask` is 0 are ignored (may be -100). Unmasked targets must lie
        in `[0, V)`: an out-of-range target silently counts as `lse` (no error can be raised under jit).
      mask: `[N]` bool or float weights; a float mask weights each token's loss.
      chunk_size: tokens per chunk; the peak extra memory is about `3 * chunk_size * V * 4` bytes.
      logits_dtype: dtype the logits matmul produces (fp32 accumulate); the log-sum-exp is always fp32. A
        composite weight computes its product in `hidden.dtype` and the result is cast.
      transposed: `head_w` is `[V, D]`. The chunk loop then contracts the table as it is stored. Passing `embed.T`
        gives the same numbers, but XLA writes the transposed copy (a [D, V] array) before the loop on
        every call: a transpose outside a loop is not folded into the matmuls inside it.

    Returns:
      `(loss_sum, n_tokens)`: fp32 scalars, `sum(mask * (lse - logit[target]))` and `sum(mask)`. No gradient
      flows to `mask` or `targets`.
    """
    if hidden.ndim != 2 or targets.shape != hidden.shape[:1] or mask.shape != hidden.shape[:1]:
        raise ValueError(
            f"cross_entropy_sum: expected hidden [N, D], targets [N], mask [N]; got {hidden.shape}, "
            f"{targets.shape}, {mask.shape}; flatten batch and time first"
        )
    if transposed and isinstance(head_w, Weight):
        raise ValueError("cross_entropy_sum: transposed=True takes a plain [V, D] array; pass a composite head "
                         "weight as [D, V] with transposed=False")
    d_axis = 1 if transposed else 0
    if len(head_w.shape) != 2 or head_w.shape[d_axis] != hidden.shape[1]:
        want = "[V, D]" if transposed else "[D, V]"
        raise ValueError(
            f"cross_entropy_sum: head weight must be {want} with D={hidden.shape[1]}, got {tuple(head_w.shape)}; "
            "for tied embeddings pass the [V, D] table with transposed=True"
        )
    if chunk_size < 1:
        raise ValueError(f"cross_entropy_sum: chunk_size must be >= 1, got {chunk_size}")
    mask_f = mask.astype(jnp.float32)
    n_tokens = jnp.sum(mask_f)
    n = hidden.shape[0]
    if n == 0:
        return jnp.zeros((), jnp.float32), n_tokens
    chunk = min(chunk_size, n)
    n_chunks = -(-n // chunk)
    h_kcd, t_kc, m_kc = (_chunked(x, n_chunks, chunk) for x in (hidden, targets.astype(jnp.int32), mask_f))
    if isinstance(head_w, Weight):
        loss = _loss_autodiff(h_kcd, head_w, t_kc, m_kc, jnp.dtype(logits_dtype))
    else:
        loss = _loss_dense(h_kcd, head_w, t_kc, m_kc, jnp.dtype(logits_dtype), transposed)
    return loss, n_tokens


def causal_lm_loss(
    hidden: jax.Array,
    head_w: Any,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    segment_ids: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[jax.Array, jax.Array]:
    """Shifted next-token loss of a (possibly packed) batch: position t predicts token t+1.

    Args:
      hidden: `[B, T, D]` final hidden states.
      head_w: lm_head weight `[D, V]` (plain or composite), or the `[V, D]` embedding table with
        `transposed=True` (tied embeddings).
      input_ids: `[B, T]` token ids.
      loss_mask: `[B, T]` bool/float, true on tokens that are trained on as TARGETS (e.g. assistant tokens).
      segment_ids: `[B, T]` packed-sequence ids, 0 for padding; None means one sequence per row.
      **kwargs: `chunk_size`, `logits_dtype`, `transposed` for `cross_entropy_sum`.

    Returns:
      `(loss_sum, n_tokens)` fp32: a pair (t, t+1) counts where `loss_mask[:, t+1]` and
      `segment_ids[:, t+1] == segment_ids[:, t] != 0`.
    """
    b, t, d = hidden.shape
    if input_ids.shape != (b, t) or loss_mask.shape != (b, t):
        raise ValueError(
            f"causal_lm_loss: input_ids and loss_mask must be [B, T] = {(b, t)}, got {input_ids.shape}, "
            f"{loss_mask.shape}"
        )
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    elif segment_ids.shape != (b, t):
        raise ValueError(f"causal_lm_loss: segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    same_seq = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
    weight = loss_mask[:, 1:].astype(jnp.float32) * same_seq
    # Keep all T positions (the last one masked) so the flattening of hidden is a free reshape, not a copy.
    targets_bt = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weight_bt = jnp.pad(weight, ((0, 0), (0, 1)))
    return cross_entropy_sum(hidden.reshape(b * t, d), head_w, targets_bt.reshape(-1), weight_bt.reshape(-1), **kwargs)


def _chunked(x: jax.Array, n_chunks: int, chunk: int) -> jax.Array:
    """`[N, ...] -> [n_chunks, chunk, ...]`, zero-padded at the end (padding carries mask 0)."""
    pad = n_chunks * chunk - x.shape[0]
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(n_chunks, chunk, *x.shape[1:])


def _chunk_forward(logits_cv: jax.Array, t_c: jax.Array, m_c: jax.Array, *, gather: bool):
    """fp32 logits `[C, V]` -> (masked loss sum, exp(logits - max) `[C, V]`, its row sums `[C, 1]`, one-hot mask).

    `gather=True` reads the C target logits with take_along_axis (no extra pass over `[C, V]`; used where no
    autodiff follows). `gather=False` selects them with a one-hot comparison, whose autodiff is a fused select
    rather than the scatter-add into `[C, V]` zeros that take_along_axis would transpose to.
    """
    logits_cv = logits_cv.astype(jnp.float32)
    # lse is invariant to the shift, so the max needs no gradient (saves autodiff an argmax scatter).
    row_max = jax.lax.stop_gradient(jnp.max(logits_cv, axis=-1, keepdims=True))
    exp_cv = jnp.exp(logits_cv - row_max)
    sum_c1 = jnp.sum(exp_cv, axis=-1, keepdims=True)
    lse_c = (jnp.log(sum_c1) + row_max)[:, 0]
    onehot_cv = jnp.arange(logits_cv.shape[-1], dtype=jnp.int32)[None, :] == t_c[:, None]
    if gather:
        safe_t = jnp.clip(t_c, 0, logits_cv.shape[-1] - 1)  # masked targets may be -100
        target_c = jnp.take_along_axis(logits_cv, safe_t[:, None], axis=-1)[:, 0]
    else:
        target_c = jnp.sum(jnp.where(onehot_cv, logits_cv, 0.0), axis=-1)
    return jnp.sum((lse_c - target_c) * m_c), exp_cv, sum_c1, onehot_cv


def _logits(h_cd: jax.Array, w: jax.Array, logits_dtype, transposed: bool) -> jax.Array:
    # The plain-array case of `linear`, with an fp32 (logits_dtype) output instead of one rounded to hidden.dtype.
    return jnp.einsum("cd,vd->cv" if transposed else "cd,dv->cv", h_cd, w.astype(h_cd.dtype),
                      preferred_element_type=logits_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _loss_dense(h_kcd, w, t_kc, m_kc, logits_dtype, transposed):
    """Loss only (no gradient requested): a scan over chunks. `h_kcd[K, C, D]`, `t_kc`, `m_kc[K, C]`; `w` is
    `[D, V]`, or `[V, D]` when `transposed`."""

    def body(total, xs):
        h_cd, t_c, m_c = xs
        return total + _chunk_forward(_logits(h_cd, w, logits_dtype, transposed), t_c, m_c, gather=True)[0], None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_kcd, t_kc, m_kc))[0]


def _loss_dense_fwd(h_kcd, w, t_kc, m_kc, logits_dtype, transposed):
    """Loss plus d loss / d hidden `[K, C, D]` and d loss / d W (each only if its input is perturbed)."""
    want_dh, want_dw = h_kcd.perturbed, w.perturbed
    h_kcd, w, t_kc, m_kc = h_kcd.value, w.value, t_kc.value, m_kc.value
    cdt = h_kcd.dtype
    w_cdt = w.astype(cdt)

    def body(dw_dv, xs):
        h_cd, h_dc, t_c, m_c = xs
        loss, exp_cv, sum_c1, onehot_cv = _chunk_forward(_logits(h_cd, w, logits_dtype, transposed), t_c, m_c,
                                                         gather=True)
        # d loss / d logits = mask * (softmax - onehot); rounded to the compute dtype for the two matmuls, as
        # autodiff of a bf16 matmul would.
        g_cv = (exp_cv * (m_c[:, None] / sum_c1) - jnp.where(onehot_cv, m_c[:, None], 0.0)).astype(cdt)
        dh_cd = None
        if want_dh:
            dh_cd = jnp.einsum("cv,vd->cd" if transposed else "cv,dv->cd", g_cv, w_cdt,
                               preferred_element_type=jnp.float32).astype(cdt)
        if want_dw:
            dw_dv = dw_dv + jnp.einsum("dc,cv->dv", h_dc, g_cv, preferred_element_type=jnp.float32)
        return dw_dv, (loss, dh_cd)

    d, v = w.shape[::-1] if transposed else w.shape
    dw0 = jnp.zeros((d, v), jnp.float32) if want_dw else None
    # h is handed to the loop also transposed, [K, D, C]: XLA:CPU's dot is slower when it contracts the leading
    # axis of both operands (h.T @ G) than on a plain [D, C] @ [C, V].
    h_kdc = jnp.swapaxes(h_kcd, 1, 2)
    dw_dv, (loss_k, dh_kcd) = jax.lax.scan(body, dw0, (h_kcd, h_kdc, t_kc, m_kc))
    if want_dw:
        dw_dv = (dw_dv.T if transposed else dw_dv).astype(w.dtype)
    return jnp.sum(loss_k), (dh_kcd, dw_dv)


def _loss_dense_bwd(logits_dtype, transposed, res, ct):
    del logits_dtype, transposed
    dh_kcd, dw_dv = res
    if isinstance(ct, SymbolicZero):
        return None, None, None, None
    dh = None if dh_kcd is None else (dh_kcd * ct).astype(dh_kcd.dtype)
    dw = None if dw_dv is None else (dw_dv * ct).astype(dw_dv.dtype)
    return dh, dw, None, None


_loss_dense.defvjp(_loss_dense_fwd, _loss_dense_bwd, symbolic_zeros=True)


def _loss_autodiff(h_kcd: jax.Array, head_w: Weight, t_kc: jax.Array, m_kc: jax.Array, logits_dtype) -> jax.Array:
    """Composite head weight: autodiff through `linear`, one chunk of logits live at a time (remat per chunk)."""

    @jax.checkpoint
    def chunk_loss(w, h_cd, t_c, m_c):
        return _chunk_forward(linear(h_cd, w).astype(logits_dtype), t_c, m_c, gather=False)[0]

    def body(total, xs):
        return total + chunk_loss(head_w, *xs), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_kcd, t_kc, m_kc))[0]
