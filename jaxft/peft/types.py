"""Composite weight leaves: LoRA, DoRA, IA3 and Houlsby bottleneck adapters.

Each type wraps a `base` weight (a plain `kernel[in, out]` array, or another composite such as NF4) and computes
its product with `x` itself through `jaxft.ops.linear.linear`, so the model never learns which method is in use.
They are registered pytree dataclasses: under `jax.lax.scan` over stacked layers every array field is sliced along
axis 0, so inside a layer `a` is `[in, r]` and `b` is `[r, out]`, while `materialize` also works on the stacked
`[L, in, r]` leaves (merging and export).

Per-layer hyper-parameters are arrays so that they slice with the layer: `scale` is `[L]` (or `[]` for an unstacked
leaf), and `active` (`[L]` bool) marks the layers the adapter transforms. An inactive layer computes exactly the base
layer whatever its adapter values hold, and sends no gradient to them (peft's `layers_to_transform` with stacked
layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.ops.linear import Weight, linear, materialize

_STATIC = dict(static=True)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout as `torch.nn.Dropout` computes it (keep with prob 1 - rate, scale by 1 / (1 - rate))."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


@jax.custom_vjp
def lora_branch(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """The LoRA branch alone, `scale * (x @ a) @ b`: `x[..., in]`, `a[in, r]`, `b[r, out]`, `scale[]`, all in one
    dtype -> `[..., out]`. The caller adds it to the base product (with dropout on `x`, or over a composite base);
    `lora_linear` is the whole layer `x @ w + branch` for a plain base.

    A custom VJP: the backward pass computes exactly `g b^T` (once, shared by the gradients of x, a and scale),
    `x^T (g b^T)`, `(x a)^T g` and `(g b^T) a^T`, contracting the leading axes directly, because XLA's autodiff of
    the same einsums is far slower on CPU (benchmarks/RESULTS.md). Reverse mode only (no `jax.jvp` through a LoRA
    leaf).
    """
    return scale * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)


def _lora_branch_fwd(x, a, b, scale):
    xa = jnp.einsum("...i,ir->...r", x, a)
    return scale * jnp.einsum("...r,ro->...o", xa, b), (x, xa, a, b, scale)


def _lora_branch_bwd(res, g, input_grad=True):
    x, xa, a, b, scale = res
    g_b = jnp.einsum("...o,ro->...r", g, b)  # g b^T, [..., r]
    g_xa = scale * g_b
    grad_x = jnp.einsum("...r,ir->...i", g_xa, a) if input_grad else None
    # Both weight gradients contract the tokens with the small [..., r] factor on the left, so the big operand is
    # read in its stored layout (with x^T as the left operand XLA:CPU writes a transposed copy of x per layer).
    # The barrier keeps XLA from folding the final transpose into the product: folded, the product contracts x's
    # leading axis, which YNNPACK does not take, and falls back to Eigen, which packs x first.
    grad_a = jax.lax.optimization_barrier(jnp.einsum("...r,...i->ri", g_xa, x)).T
    grad_b = scale * jnp.einsum("...r,...o->ro", xa, g)
    grad_scale = jnp.sum(xa * g_b).astype(scale.dtype)  # d/ds of sum(g * s (xa) b) = sum(xa * (g b^T))
    return grad_x, grad_a, grad_b, grad_scale


lora_branch.defvjp(_lora_branch_fwd, _lora_branch_bwd)


@jax.custom_vjp
def lora_linear(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """The whole LoRA layer `x @ w + scale * (x @ a) @ b` for a plain base `w[in, out]` (any float dtype; cast to
    x's), without dropout. `a`, `b`, `scale` in x's dtype. (`lora_branch` is the second term alone.)

    With more tokens than the weight has rows (forward) or columns (backward), the product runs through the merged
    weight `w + scale * a @ b`, formed in each pass (an `[in, out]` add, r MACs per weight element; not kept, as
    under a scan a kept weight-sized array is a stack), instead of the extra `[tokens, r] @ [r, out]` product
    (forward) or `[tokens, r] @ [r, in]` product (input gradient) and the add of its `[tokens, .]` output: with
    many tokens that is the cheaper way (measured in benchmarks/RESULTS.md). Fewer tokens (decoding) keep the
    factored products, which are then the cheaper ones. The weight gradients are `lora_branch`'s. The base's
    gradient `x^T g` is returned too; XLA drops it when nothing asks for it (a frozen base).
    """
    return _lora_linear_fwd(x, w, a, b, scale)[0]


def _merged(w, a, b, scale, dtype):
    """`w + scale * a @ b` in fp32, cast to `dtype`."""
    return (w.astype(jnp.float32) + scale.astype(jnp.float32) * (a.astype(jnp.float32) @ b.astype(jnp.float32))
            ).astype(dtype)


def _tokens(x: jax.Array) -> int:
    return math.prod(x.shape[:-1])


def _lora_linear_fwd(x, w, a, b, scale):
    xa = jnp.einsum("...i,ir->...r", x, a)
    if _tokens(x) > w.shape[0]:
        y = jnp.einsum("...i,io->...o", x, _merged(w, a, b, scale, x.dtype))
    else:
        y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype)) + jnp.einsum("...r,ro->...o", scale * xa, b)
    return y, (x, xa, w, a, b, scale)


def _lora_linear_bwd(res, g):
    x, xa, w, a, b, scale = res
    merge = _tokens(x) > w.shape[1]
    grad_w = jnp.einsum("...i,...o->io", x, g).astype(w.dtype)
    lora_x, grad_a, grad_b, grad_scale = _lora_branch_bwd((x, xa, a, b, scale), g, input_grad=not merge)
    if merge:
        grad_x = jnp.einsum("...o,io->...i", g, _merged(w, a, b, scale, x.dtype))
    else:
        grad_x = jnp.einsum("...o,io->...i", g, w.astype(x.dtype)) + lora_x
    return grad_x, grad_w, grad_a, grad_b, grad_scale


lora_linear.defvjp(_lora_linear_fwd, _lora_linear_bwd)


def _freeze_inactive(value: jax.Array, active: jax.Array | None) -> jax.Array:
    """`value`, with its gradient cut where the layer is not transformed (`active[...]` broadcasts on axis 0)."""
    if active is None:
        return value
    mask = jnp.reshape(active, active.shape + (1,) * (value.ndim - active.ndim))
    return jnp.where(mask, value, jax.lax.stop_gradient(value))


def _per_layer(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a `[L]` (or `[]`) per-layer value to broadcast against a `[L, *rest]` array of `ndim` dims."""
    v = jnp.asarray(v)
    return jnp.reshape(v, v.shape + (1,) * (ndim - v.ndim))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Lora(Weight):
    """`y = linear(x, base, bias) + scale * (dropout(x) @ a) @ b` (peft's LoRA; rsLoRA only changes `scale`).

    base: weight `[in, out]`; a `[in, r]`; b `[r, out]`; scale `[]` (alpha / r, or alpha / sqrt(r)); zero on
    layers the adapter does not transform. dropout_key: a PRNG key (one per layer when stacked) or None for
    inference; dropout_rate is static. The product pays for `x @ a` and `(x a) @ b` beside the base product and
    never forms `W + s a b`, except without dropout on a plain base over more tokens than the weight has rows or
    columns (training batches), where `lora_linear` forms it in that pass because it is then the cheaper way.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    scale: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: float = dataclasses.field(default=0.0, metadata=_STATIC)

    def delta(self) -> jax.Array:
        """`scale * a @ b`, `[..., in, out]` in fp32 (stacked leaves give one delta per layer)."""
        ab = jnp.einsum("...ir,...ro->...io", self.a.astype(jnp.float32), self.b.astype(jnp.float32))
        return _per_layer(self.scale, ab.ndim).astype(jnp.float32) * ab

    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        a, b, scale = self.a.astype(x.dtype), self.b.astype(x.dtype), jnp.asarray(self.scale, x.dtype)
        fused = getattr(self.base, "apply_lora", None)  # a base with its own fused LoRA product (NF4: QLoRA)
        if fused is not None:
            y = fused(x, _dropout(x, self.dropout_rate, self.dropout_key), a, b, scale)
            return y if bias is None else y + bias.astype(y.dtype)
        if not isinstance(self.base, Weight) and (self.dropout_key is None or self.dropout_rate == 0.0):
            y = lora_linear(x, self.base, a, b, scale)
            return y if bias is None else y + bias.astype(y.dtype)
        y = linear(x, self.base, bias)
        lora = lora_branch(_dropout(x, self.dropout_rate, self.dropout_key), a, b, scale)
        return y + lora.astype(y.dtype)

    def materialize(self) -> jax.Array:
        w = materialize(self.base)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Dora(Weight):
    """peft's DoRA: `y = f * (x W + scale * (x a) b) + bias` with `f = magnitude / ||W + scale * a b||`.

    The norm is per output feature (the column norm of `kernel[in, out]`, HF's row norm of `weight[out, in]`) and is
    detached from the gradient graph, as the DoRA paper (section 4.3) and peft do. The bias is added after the
    rescaling, unscaled. With dropout in training peft computes `x W + bias + (f - 1) * d(x) W + f * s * (d(x) a) b`
    (the magnitude path sees the dropped input); this does the same. Without dropout it is `f` times the LoRA
    layer's product (`lora_linear` on a plain base): the same sum, without keeping `x W` apart from it (faster and
    less scratch memory; benchmarks/RESULTS.md).

    magnitude `[out]`; active `[]` bool: on an inactive layer `f = 1`, so the layer is the base layer.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    magnitude: jax.Array
    scale: jax.Array
    active: jax.Array
    dropout_key: jax.Array | None = None
    dropout_rate: float = dataclasses.field(default=0.0, metadata=_STATIC)

    def lora(self) -> Lora:
        """The LoRA layer inside (same base and factors, without the magnitude)."""
        return Lora(self.base, self.a, self.b, self.scale)

    def factor(self) -> jax.Array:
        """`f = magnitude / ||W + s a b||` per output feature, `[..., out]` fp32, no gradient through the norm; 1 on
        inactive layers."""
        w = materialize(self.base).astype(jnp.float32)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w + jax.lax.stop_gradient(self.lora().delta()), axis=-2))
        mag = _freeze_inactive(self.magnitude.astype(jnp.float32), self.active)
        active = _per_layer(self.active, mag.ndim)
        return jnp.where(active, mag / jnp.where(active, norm, 1.0), 1.0)

    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        f = self.factor().astype(x.dtype)
        if self.dropout_key is None or self.dropout_rate == 0.0:
            # base + (f - 1) base + f lora = f (x W + lora): the LoRA layer's own product (`lora_linear`).
            y = f * self.lora().apply(x, None)
        else:
            xd = _dropout(x, self.dropout_rate, self.dropout_key)
            lora = lora_branch(xd, self.a.astype(x.dtype), self.b.astype(x.dtype), jnp.asarray(self.scale, x.dtype))
            y = linear(x, self.base, None) + (f - 1) * linear(xd, self.base, None) + f * lora
        if bias is not None:
            y = y + bias.astype(y.dtype)
        return y

    def materialize(self) -> jax.Array:
        w = materialize(self.base)
        merged = self.factor()[..., None, :] * (w.astype(jnp.float32) + self.lora().delta())
        return merged.astype(w.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class IA3(Weight):
    """peft's (IA)^3: a learned vector scales the input (`on_input`, feedforward targets such as down_proj:
    `linear(x * l, base, bias)`) or the output, bias included (`linear(x, base, bias) * l`).

    scale `[in]` when on_input else `[out]`; active `[]` bool: an inactive layer uses `l = 1`.
    """

    base: Any
    scale: jax.Array
    active: jax.Array
    on_input: bool = dataclasses.field(default=False, metadata=_STATIC)

    def vector(self) -> jax.Array:
        """The effective scaling vector `[..., in or out]` (1 on inactive layers, no gradient there)."""
        l = _freeze_inactive(self.scale, self.active)
        return jnp.where(_per_layer(self.active, l.ndim), l, jnp.ones_like(l))

    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        l = self.vector().astype(x.dtype)
        if self.on_input:
            return linear(x * l, self.base, bias)
        return linear(x, self.base, bias) * l

    def materialize(self) -> jax.Array:
        w = materialize(self.base)
        l = self.vector().astype(jnp.float32)
        scaled = w.astype(jnp.float32) * (l[..., :, None] if self.on_input else l[..., None, :])
        return scaled.astype(w.dtype)

    def merge_bias(self, bias: jax.Array) -> jax.Array:
        """The bias of the merged layer: scaled with the output (peft scales it for non-feedforward targets)."""
        if self.on_input:
            return bias
        return (bias.astype(jnp.float32) * self.vector().astype(jnp.float32)).astype(bias.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)


_ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda v: jax.nn.gelu(v, approximate=False), "silu": jax.nn.silu,
                "tanh": jnp.tanh}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Houlsby(Weight):
    """A Houlsby bottleneck adapter on the output of a projection: `h = linear(x, base, bias)`,
    `y = h + act(h @ down + down_bias) @ up + up_bias`.

    Placed on o_proj and down_proj it sits after the attention block and after the MLP, before each residual add,
    which is where Houlsby et al. (2019) put it. down `[out, m]`, up `[m, out]`. Not a linear map of `x`: it has
    no dense matrix, so `materialize` refuses (the adapter is not mergeable).
    """

    base: Any
    down: jax.Array
    down_bias: jax.Array
    up: jax.Array
    up_bias: jax.Array
    activation: str = dataclasses.field(default="relu", metadata=_STATIC)

    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        h = linear(x, self.base, bias)
        z = _ACTIVATIONS[self.activation](linear(h, self.down, self.down_bias))
        return h + linear(z, self.up, self.up_bias).astype(h.dtype)

    def materialize(self) -> jax.Array:
        raise ValueError("Houlsby: a bottleneck adapter is not a linear map and cannot be merged into the weight; "
                         "keep it as an adapter (save it with jaxft.peft.save_adapter)")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)
