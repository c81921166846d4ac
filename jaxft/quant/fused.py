"""LoRA over an NF4 base as one product: `y = x W + scale * (xd a) b`, `W` the NF4 weight dequantised on the fly.

A `jax.custom_vjp` for the whole layer (like `jaxft.peft.types.lora_linear` for a dense base), so the backward
pass keeps the adapter's input `xd` once, `xd a` (`[..., r]`) and the NF4 tensor's stored fields (packed codes,
absmax tables), and never a dequantised copy of `W` or the fp32 absmax; the absmax tables are decoded again in the
backward pass (`[in/64, out]`, 1/64 of the weight). `x` (the base's input) is not kept at all: the input gradient
through the frozen base is `g W^T` (the transposed NF4 kernel), and the base gets no gradient. Without dropout
`xd` is `x` itself and is stored once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant.kernels import dispatch


@jax.custom_vjp
def lora_linear(x: jax.Array, xd: jax.Array, w, a: jax.Array, b: jax.Array,
                scale: jax.Array) -> jax.Array:
    """`x[..., in] @ W + scale * (xd[..., in] @ a[in, r]) @ b[r, out]` for one (unstacked) `jaxft.quant.NF4Tensor` `W[in, out]`;
    `xd` is `x` after the adapter's dropout (`x` itself without). `a`, `b`, `scale` in x's dtype; output in x's."""
    return _fwd(x, xd, w, a, b, scale)[0]


def _fwd(x, xd, w, a, b, scale):
    xa = jnp.einsum("...i,ir->...r", xd, a)
    y = dispatch.matmul(x, w.packed(), w.absmax_f32()) + jnp.einsum("...r,ro->...o", scale * xa, b)
    return y, (xd, xa, w, a, b, scale)


def _zero_cotangent(v: jax.Array | None):
    if v is None:
        return None
    if jnp.issubdtype(v.dtype, jnp.inexact):
        return jnp.zeros_like(v)
    return np.zeros(v.shape, jax.dtypes.float0)


def _bwd(res, g):
    xd, xa, w, a, b, scale = res
    g2 = g.reshape(-1, g.shape[-1])
    grad_x = dispatch.run("matmul_t", g2, w.packed(), w.absmax_f32()).reshape(*g.shape[:-1], w.shape[-2])
    g_b = jnp.einsum("...o,ro->...r", g, b)  # g b^T, [..., r]
    g_xa = scale * g_b
    grad_xd = jnp.einsum("...r,ir->...i", g_xa, a)
    grad_a = jnp.einsum("...i,...r->ir", xd, g_xa)
    grad_b = scale * jnp.einsum("...r,...o->ro", xa, g)
    grad_scale = jnp.sum(xa * g_b).astype(scale.dtype)
    grad_w = jax.tree.map(_zero_cotangent, w)
    return grad_x.astype(g.dtype), grad_xd, grad_w, grad_a, grad_b, grad_scale


lora_linear.defvjp(_fwd, _bwd)
