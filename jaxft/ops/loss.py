"""Chunked cross-entropy for causal LM training, without `[tokens, vocab]` fp32 logits in memory at once.

`cross_entropy_sum` returns the SUM of token losses and the number of loss tokens, so a trainer that accumulates
micro-batches divides once by the loss-token count of the whole step (not a mean of micro-batch means).

Two paths, chosen by the type of the head weight:

Chunks run along the sequence of every row at once (`[B, C]` tokens per chunk, about `chunk_size` in all), never
across rows: with the rows split over devices (data parallelism), each device computes the loss of its own rows
only, which a chunking of the flattened `[B * T]` tokens would not allow (a chunk would hold other devices' rows).

- plain array `head_w[D, V]` (or a tied head's `[V, D]` embedding table with `transposed=True`): a `custom_vjp`.
  Per chunk of tokens it computes the logits, the fp32 log-sum-exp and, when differentiating, the logit gradient
  `G = mask * (softmax - onehot)` right away, with `dh = G @ W.T` and `dW += h.T @ G`. That is three matmuls per
  chunk (as autodiff) but one pass of `exp`, no recomputation, and no scatter: the one-hot term is a fused
  comparison with an iota. Only the gradients asked for are computed
  (`symbolic_zeros`: a frozen head, as in LoRA, costs no `dW` matmul).
- composite `Weight` (LoRA on the head, ...): plain autodiff through `linear`, with each chunk rematerialised
  (`jax.checkpoint`) so the backward pass also holds one chunk of logits at a time.

On a device mesh (traced under `jax.set_mesh`) the plain-array path is vocabulary-parallel: the head is split by
vocabulary over every mesh axis once per step (one all-to-all of the compute-dtype head from its FSDP split on the
model dimension), each chunk's hidden rows are gathered from the data-parallel devices (a chunk's rows are small),
and each device computes the logits, softmax and gradients of its slice of the vocabulary for all rows: the
log-sum-exp and the target logit are sums over the vocabulary that GSPMD turns into small all-reduces, `dh` is
reduce-scattered back onto the rows, and `dW` stays split by vocabulary (a `[D, V / n]` accumulator per device).
Split by rows instead, every device would gather the whole head and build a whole-head partial `dW` per chunk
(Llama-3.1-8B: `[4096, 128256]`, 2 GiB in fp32, twice, on each device). The vocabulary must divide by the mesh size;
if it does not, the chunks stay split by rows.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec

from jaxft.ops.linear import Weight, linear
from jaxft.ops.sharding import batch_rows, data_axes

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
    _check_head(head_w, hidden.shape[1], transposed)
    return _rows_loss(hidden[None], head_w, targets[None], mask[None], chunk_size, logits_dtype, transposed)


def _rows_loss(hidden_btd: jax.Array, head_w: Any, targets_bt: jax.Array, mask_bt: jax.Array, chunk_size: int,
               logits_dtype: Any, transposed: bool) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy_sum` of `[B, T]` rows, chunked along T with about `chunk_size` tokens per chunk."""
    if chunk_size < 1:
        raise ValueError(f"cross_entropy_sum: chunk_size must be >= 1, got {chunk_size}")
    mask_f = mask_bt.astype(jnp.float32)
    n_tokens = jnp.sum(mask_f)
    b, t = targets_bt.shape
    if b * t == 0:
        return jnp.zeros((), jnp.float32), n_tokens
    chunk = min(t, -(-chunk_size // b))  # positions per row per chunk: about chunk_size tokens in all
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    if pad:  # padding carries mask 0
        hidden_btd, targets_bt, mask_f = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                                          for x in (hidden_btd, targets_bt, mask_f))
    targets_bt = targets_bt.astype(jnp.int32)
    if isinstance(head_w, Weight):
        loss = _loss_autodiff(hidden_btd, head_w, targets_bt, mask_f, jnp.dtype(logits_dtype), chunk)
    else:
        loss = _loss_dense(hidden_btd, head_w, targets_bt, mask_f, jnp.dtype(logits_dtype), transposed, chunk)
    return loss, n_tokens


def _check_head(head_w: Any, d: int, transposed: bool) -> None:
    if transposed and isinstance(head_w, Weight):
        raise ValueError("cross_entropy_sum: transposed=True takes a plain [V, D] array; pass a composite head "
                         "weight as [D, V] with transposed=False")
    d_axis = 1 if transposed else 0
    if len(head_w.shape) != 2 or head_w.shape[d_axis] != d:
        want = "[V, D]" if transposed else "[D, V]"
        raise ValueError(
            f"cross_entropy_sum: head weight must be {want} with D={d}, got {tuple(head_w.shape)}; "
            "for tied embeddings pass the [V, D] table with transposed=True"
        )


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
    # Keep all T positions (the last one masked) so that hidden is chunked as it is, not cut and copied.
    targets_bt = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))
    weight_bt = jnp.pad(weight, ((0, 0), (0, 1)))
    unknown = set(kwargs) - {"chunk_size", "logits_dtype", "transposed"}
    if unknown:
        raise TypeError(f"causal_lm_loss: unexpected keyword arguments {sorted(unknown)}")
    transposed = kwargs.get("transposed", False)
    _check_head(head_w, d, transposed)
    return _rows_loss(hidden, head_w, targets_bt, weight_bt, kwargs.get("chunk_size", DEFAULT_CHUNK_SIZE),
                      kwargs.get("logits_dtype", jnp.float32), transposed)


def _chunk_forward(logits_bcv: jax.Array, t_bc: jax.Array, m_bc: jax.Array, *, gather: bool):
    """fp32 logits `[..., V]` -> (masked loss sum, exp(logits - max) `[..., V]`, its row sums `[..., 1]`, one-hot
    mask).

    `gather=True` reads the target logits with take_along_axis (no extra pass over `[..., V]`; used where no
    autodiff follows). `gather=False` selects them with a one-hot comparison, whose autodiff is a fused select
    rather than the scatter-add into `[..., V]` zeros that take_along_axis would transpose to.
    """
    logits_bcv = logits_bcv.astype(jnp.float32)
    # lse is invariant to the shift, so the max needs no gradient (saves autodiff an argmax scatter).
    row_max = jax.lax.stop_gradient(jnp.max(logits_bcv, axis=-1, keepdims=True))
    exp_bcv = jnp.exp(logits_bcv - row_max)
    sum_bc1 = jnp.sum(exp_bcv, axis=-1, keepdims=True)
    lse_bc = (jnp.log(sum_bc1) + row_max)[..., 0]
    onehot_bcv = jnp.arange(logits_bcv.shape[-1], dtype=jnp.int32) == t_bc[..., None]
    if gather:
        safe_t = jnp.clip(t_bc, 0, logits_bcv.shape[-1] - 1)  # masked targets may be -100
        target_bc = jnp.take_along_axis(logits_bcv, safe_t[..., None], axis=-1)[..., 0]
    else:
        target_bc = jnp.sum(jnp.where(onehot_bcv, logits_bcv, 0.0), axis=-1)
    return jnp.sum((lse_bc - target_bc) * m_bc), exp_bcv, sum_bc1, onehot_bcv


def _vocab_axes(v: int) -> tuple[str, ...]:
    """The mesh axes the vocabulary is split over inside the loss: every axis of the current mesh with more than
    one device, `data` last, when their product divides `v`; () without a mesh or when it does not (chunks split
    by rows)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    axes = tuple(a for a, n in dict(mesh.shape).items() if n > 1)
    if not axes or v % math.prod(dict(mesh.shape)[a] for a in axes):
        return ()
    return tuple(a for a in axes if a != "data") + tuple(a for a in axes if a == "data")


def _split(x: jax.Array, dim: int | None, axes: tuple[str, ...]) -> jax.Array:
    """`x` split over `axes` along `dim` and replicated along the rest (`dim` None: replicated); a no-op when
    `axes` is empty (no mesh, or the rows-split path)."""
    if not axes:
        return x
    spec = [None] * x.ndim
    if dim is not None:
        spec[dim] = axes if len(axes) > 1 else axes[0]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def _rows_at(x: jax.Array, axis: int, vocab: tuple[str, ...]) -> jax.Array:
    """Vocabulary-parallel only: `x` split by rows (dimension `axis`) over the data-parallel axes. A chunk is cut
    from the row-split hidden state, then gathered (`_gather_chunk`): with the replicated constraint alone, GSPMD
    gathers all rows of the whole hidden state (and its transposed copy) before the chunk loop."""
    rows = data_axes()
    if not vocab or not rows:
        return x
    spec = [None] * x.ndim
    spec[axis] = rows if len(rows) > 1 else rows[0]
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def _gather_chunk(x: jax.Array, axis: int, vocab: tuple[str, ...]) -> jax.Array:
    """A chunk of the hidden state (rows on dimension `axis`), cut while split by rows, then whole on every device."""
    return _split(_rows_at(x, axis, vocab), None, vocab)


def _vocab_split(w_cdt: jax.Array, v_dim: int, vocab: tuple[str, ...]) -> jax.Array:
    """The compute-dtype head split by vocabulary over `vocab`, once per step, outside the chunk loop (a cast or
    split inside it as well made XLA gather the FSDP-sharded fp32 head again). In two steps: the parameters are
    whole on every `data` index (FSDP and tensor parallelism split them over the other axes), so the head is first
    split over the other axes (an all-to-all from their split of its model dimension), then over `data` (a local
    slice). In one step, on a mesh with `data` and another axis, GSPMD replicates the whole head first."""
    return _split(_split(w_cdt, v_dim, tuple(a for a in vocab if a != "data")), v_dim, vocab)


def _logits(h_bcd: jax.Array, w: jax.Array, logits_dtype, transposed: bool, vocab: tuple[str, ...]) -> jax.Array:
    # The plain-array case of `linear`, with an fp32 (logits_dtype) output instead of one rounded to hidden.dtype.
    # Vocabulary-parallel (`vocab` axes): every row, this device's slice of the vocabulary. Otherwise the rows
    # stay split over the data-parallel devices (the vocabulary axis is left to GSPMD).
    logits = jnp.einsum("bcd,vd->bcv" if transposed else "bcd,dv->bcv", _gather_chunk(h_bcd, 0, vocab),
                        w.astype(h_bcd.dtype), preferred_element_type=logits_dtype)
    return _split(logits, 2, vocab) if vocab else batch_rows(logits, rest_free=True)


def _slice(x: jax.Array, k: jax.Array, chunk: int, axis: int = 1) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, k * chunk, chunk, axis=axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _loss_dense(h_btd, w, t_bt, m_bt, logits_dtype, transposed, chunk):
    """Loss only (no gradient requested): a loop over chunks of `chunk` positions of every row. `h_btd[B, T, D]`,
    `t_bt`, `m_bt[B, T]` (T a multiple of chunk); `w` is `[D, V]`, or `[V, D]` when `transposed`."""

    def body(total, k):
        h_bcd, t_bc, m_bc = (_slice(x, k, chunk) for x in (h_btd, t_bt, m_bt))
        logits = _logits(h_bcd, w_cdt, logits_dtype, transposed, vocab)
        t_bc, m_bc = _split(t_bc, None, vocab), _split(m_bc, None, vocab)
        return total + _chunk_forward(logits, t_bc, m_bc, gather=not vocab)[0], None

    vocab = _vocab_axes(w.shape[0] if transposed else w.shape[1])
    w_cdt = _vocab_split(w.astype(h_btd.dtype), 0 if transposed else 1, vocab)
    h_btd = _rows_at(h_btd, 0, vocab)
    return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(h_btd.shape[1] // chunk))[0]


def _loss_dense_fwd(h_btd, w, t_bt, m_bt, logits_dtype, transposed, chunk):
    """Loss plus d loss / d hidden `[B, T, D]` and d loss / d W (each only if its input is perturbed)."""
    want_dh, want_dw = h_btd.perturbed, w.perturbed
    h_btd, w, t_bt, m_bt = h_btd.value, w.value, t_bt.value, m_bt.value
    cdt = h_btd.dtype
    d, v = w.shape[::-1] if transposed else w.shape
    vocab = _vocab_axes(v)
    v_dim = 0 if transposed else 1
    w_cdt = _vocab_split(w.astype(cdt), v_dim, vocab)
    # h is also read as [D, B, T]: XLA:CPU's dot is slower when it contracts the leading axis of both operands
    # (h.T @ G) than on a plain [D, (B, C)] @ [(B, C), V].
    h_btd = _rows_at(h_btd, 0, vocab)
    h_dbt = _rows_at(jnp.transpose(h_btd, (2, 0, 1)), 1, vocab) if want_dw else None

    def body(carry, k):
        dh_btd, dw_dv, total = carry
        h_bcd, t_bc, m_bc = (_slice(x, k, chunk) for x in (h_btd, t_bt, m_bt))
        t_bc, m_bc = _split(t_bc, None, vocab), _split(m_bc, None, vocab)
        # vocabulary-parallel: the target logit by a one-hot sum (a sum over the split vocabulary), not a gather
        loss, exp_bcv, sum_bc1, onehot_bcv = _chunk_forward(_logits(h_bcd, w_cdt, logits_dtype, transposed, vocab),
                                                            t_bc, m_bc, gather=not vocab)
        # d loss / d logits = mask * (softmax - onehot); rounded to the compute dtype for the two matmuls, as
        # autodiff of a bf16 matmul would.
        g_bcv = (exp_bcv * (m_bc[..., None] / sum_bc1) - jnp.where(onehot_bcv, m_bc[..., None], 0.0)).astype(cdt)
        if want_dh:
            dh_bcd = jnp.einsum("bcv,vd->bcd" if transposed else "bcv,dv->bcd", g_bcv, w_cdt,
                                preferred_element_type=jnp.float32).astype(cdt)
            dh_btd = jax.lax.dynamic_update_slice_in_dim(dh_btd, batch_rows(dh_bcd), k * chunk, axis=1)
        if want_dw:
            h_dbc = _gather_chunk(_slice(h_dbt, k, chunk, axis=2), 1, vocab)
            dw_dv = _split(dw_dv + jnp.einsum("dbc,bcv->dv", h_dbc, g_bcv, preferred_element_type=jnp.float32), 1,
                           vocab)
        return (dh_btd, dw_dv, total + loss), None

    dh0 = batch_rows(jnp.zeros_like(h_btd)) if want_dh else None
    dw0 = _split(jnp.zeros((d, v), jnp.float32), 1, vocab) if want_dw else None
    (dh_btd, dw_dv, loss), _ = jax.lax.scan(body, (dh0, dw0, jnp.zeros((), jnp.float32)),
                                            jnp.arange(h_btd.shape[1] // chunk))
    if want_dw:
        dw_dv = (dw_dv.T if transposed else dw_dv).astype(w.dtype)
    return loss, (dh_btd, dw_dv)


def _loss_dense_bwd(logits_dtype, transposed, chunk, res, ct):
    del logits_dtype, transposed, chunk
    dh_btd, dw_dv = res
    if isinstance(ct, SymbolicZero):
        return None, None, None, None
    dh = None if dh_btd is None else (dh_btd * ct).astype(dh_btd.dtype)
    dw = None if dw_dv is None else (dw_dv * ct).astype(dw_dv.dtype)
    return dh, dw, None, None


_loss_dense.defvjp(_loss_dense_fwd, _loss_dense_bwd, symbolic_zeros=True)


def _loss_autodiff(h_btd: jax.Array, head_w: Weight, t_bt: jax.Array, m_bt: jax.Array, logits_dtype,
                   chunk: int) -> jax.Array:
    """Composite head weight: autodiff through `linear`, one chunk of logits live at a time (remat per chunk). The
    chunks are stacked `[K, B, C, ...]` (autodiff of a stacked scan input is a stacked output, not a sum of
    full-size updates)."""

    def stack(x):
        b, t = x.shape[:2]
        return jnp.swapaxes(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 0, 1)

    @jax.checkpoint
    def chunk_loss(w, h_bcd, t_bc, m_bc):
        logits = batch_rows(linear(batch_rows(h_bcd), w).astype(logits_dtype), rest_free=True)
        return _chunk_forward(logits, t_bc, m_bc, gather=False)[0]

    def body(total, xs):
        return total + chunk_loss(head_w, *xs), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), tuple(stack(x) for x in (h_btd, t_bt, m_bt)))[0]
