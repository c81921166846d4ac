"""RMSNorm as transformers computes it for the Llama family."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`weight * x / sqrt(mean(x**2) + eps)` over the last axis; statistics in float32, the product in x's dtype
    (the order transformers uses: normalise in fp32, cast back, then scale).

    A custom VJP that keeps only `x` and the `[..., 1]` inverse RMS for the backward pass (autodiff also keeps the
    normalised `x` and the broadcast weight: under a scan over layers each kept array is a `[layers, tokens, D]`
    stack written and read every step). Reverse mode only (no `jax.jvp` through it)."""
    return _rms_norm_fwd(x, weight, eps)[0]


def _rms_norm_fwd(x, weight, eps):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    normed = (x32 * inv).astype(x.dtype)
    return weight.astype(x.dtype) * normed, (x, weight, inv)


def _rms_norm_bwd(eps, res, g):
    """With n = x * inv: dx = inv * (dn - n * mean(dn * n)), dn = g * weight; dweight = sum of g * n."""
    x, weight, inv = res
    n = x.astype(jnp.float32) * inv
    dn = (g * weight.astype(g.dtype)).astype(jnp.float32)
    dx = inv * (dn - n * jnp.mean(dn * n, axis=-1, keepdims=True))
    lead = tuple(range(g.ndim - 1))
    dw = jnp.sum(g.astype(jnp.float32) * n.astype(x.dtype).astype(jnp.float32), axis=lead)
    return dx.astype(x.dtype), dw.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)
