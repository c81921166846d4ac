"""LoRA extraction from a dense delta by truncated SVD.

Layout: a delta is `[..., in, out]` (jaxft's `x @ W` layout); a LoRA is `a[..., in, r]`, `b[..., r, out]` with
`delta ~= scale * a @ b`. Leading `...` axes (layers stacked by `scan`) are independent modules: every function here
works per `[in, out]` slice with batched linear algebra.

Conventions, chosen to agree with peft's `add_weighted_adapter(..., combination_type="svd")` (itself taken from
kohya-ss `svd_merge_lora.py`):

- the SVD is taken of the transposed delta `[out, in]` (torch's `lora_B @ lora_A` orientation), and the singular
  values are folded into `b` (peft's `lora_B = U @ diag(S)`, `lora_A = Vh`), so `a` has orthonormal columns;
- singular vectors are unique only up to a sign per component, and LAPACK builds disagree on it (MKL in torch vs the
  LAPACK jaxlib links flip about a third of the components of random matrices). The sign is fixed here: the entry of
  largest magnitude in each column of `a` is positive. Deltas do not depend on it; peft's `svd_clamp` does (the clamp
  threshold is a quantile of the factor entries), so clamped factors match peft's only under the same sign choice.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def check_rank(rank: int, shape: tuple[int, ...], where: str) -> None:
    """Raise a one-line ValueError unless `1 <= rank <= min(in, out)` for a delta of `shape[..., in, out]`."""
    if len(shape) < 2:
        raise ValueError(f"{where}: expected a delta of shape [..., in, out], got shape {tuple(shape)}")
    limit = min(shape[-2], shape[-1])
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= limit:
        raise ValueError(
            f"{where}: rank must be an int in [1, min(in, out)={limit}] for a delta of shape {tuple(shape)}, "
            f"got {rank!r}; pass a smaller rank"
        )


def _fix_signs(a_kr: jax.Array, b_rk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Flip each rank component so that the largest-magnitude entry of `a[..., :, k]` is positive.

    `a_kr[..., in, r]`, `b_rk[..., r, out]`; the product `a @ b` is unchanged.
    """
    idx = jnp.argmax(jnp.abs(a_kr), axis=-2, keepdims=True)  # [..., 1, r]
    pivot = jnp.take_along_axis(a_kr, idx, axis=-2)
    sign = jnp.where(pivot < 0, -1.0, 1.0).astype(a_kr.dtype)  # [..., 1, r]
    return a_kr * sign, b_rk * jnp.swapaxes(sign, -1, -2)


def svd_factors(
    delta: jax.Array, rank: int, *, full_matrices: bool = True, clamp: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Truncated SVD of `delta[..., in, out]` into `a[..., in, rank]`, `b[..., rank, out]` with `delta ~= a @ b`.

    The singular values go into `b` (peft's convention, see the module docstring). `clamp` reproduces peft's
    `svd_clamp`: per module, `hi = quantile(concat(b.flat, a.flat), clamp)` (linear interpolation) and both factors
    are clipped to `[-hi, hi]` (when `hi < 0`, every entry becomes `hi`, as with torch's clamp). `full_matrices`
    only changes what LAPACK computes, never the truncated result. Computed in fp32, returned in fp32.
    """
    check_rank(rank, delta.shape, "svd_factors")
    if clamp is not None and not 0.0 <= clamp <= 1.0:
        raise ValueError(f"svd_factors: clamp is a quantile in [0, 1], got {clamp!r}")
    return _svd_factors(delta, rank, bool(full_matrices), None if clamp is None else float(clamp))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _svd_factors(delta, rank, full_matrices, clamp):
    d_oi = jnp.swapaxes(delta.astype(jnp.float32), -1, -2)  # torch's [out, in] orientation, as peft decomposes it
    u, s, vh = jnp.linalg.svd(d_oi, full_matrices=full_matrices)
    us_or = u[..., :, :rank] * s[..., None, :rank]  # peft: U @ diag(S) == column scaling, exactly
    a_ir = jnp.swapaxes(vh[..., :rank, :], -1, -2)
    b_ro = jnp.swapaxes(us_or, -1, -2)
    a_ir, b_ro = _fix_signs(a_ir, b_ro)
    if clamp is not None:
        lead = a_ir.shape[:-2]
        dist = jnp.concatenate([b_ro.reshape(*lead, -1), a_ir.reshape(*lead, -1)], axis=-1)
        hi = jnp.quantile(dist, clamp, axis=-1)[..., None, None]
        a_ir = jnp.minimum(jnp.maximum(a_ir, -hi), hi)
        b_ro = jnp.minimum(jnp.maximum(b_ro, -hi), hi)
    return a_ir, b_ro


def relative_error(delta: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`||delta - scale * a @ b||_F / ||delta||_F` per module: shape `delta.shape[:-2]`, fp32; 0 where delta is 0."""
    d = delta.astype(jnp.float32)
    approx = scale * jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    num = jnp.sqrt(jnp.sum(jnp.square(d - approx), axis=(-2, -1)))
    den = jnp.sqrt(jnp.sum(jnp.square(d), axis=(-2, -1)))
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), num)


def to_lora(
    delta: jax.Array, rank: int, *, alpha: float | None = None, rslora: bool = False
) -> tuple[jax.Array, jax.Array, float, jax.Array]:
    """Extract a rank-`rank` LoRA from a dense `delta[..., in, out]` by truncated SVD (optimal in Frobenius norm,
    Eckart-Young).

    Returns `(a[..., in, rank], b[..., rank, out], scale, rel_error[...])` with `delta ~= scale * a @ b`:

    - `alpha=None`: `scale = 1.0` and the factors carry everything (what peft's SVD merge writes, with
      `lora_alpha = r`);
    - `alpha` given: `scale = alpha / rank` (`alpha / sqrt(rank)` with `rslora=True`), and `b` is divided by it so
      the product is the same; write `r=rank, lora_alpha=alpha, use_rslora=rslora` next to such factors.

    `rel_error = ||delta - scale * a @ b||_F / ||delta||_F` per module, computed from the reconstruction (not from
    the singular values): about 1e-6 at full rank in fp32, and `sqrt(sum_{k>rank} s_k^2 / sum_k s_k^2)` below it.
    Factors are fp32; `a` has orthonormal columns.
    """
    check_rank(rank, delta.shape, "to_lora")
    a, b = svd_factors(delta, rank)
    if alpha is None:
        scale = 1.0
    else:
        if not alpha > 0:
            raise ValueError(f"to_lora: alpha must be > 0, got {alpha!r}")
        scale = float(alpha) / (math.sqrt(rank) if rslora else rank)
        b = b / scale
    return a, b, scale, relative_error(delta, a, b, scale)
