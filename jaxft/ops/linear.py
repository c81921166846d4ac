"""The one dispatch for every product with a weight.

`linear(x, w, bias)` computes `x @ w + bias` for whatever sits at the weight leaf of the parameter tree:

- a plain array `w[in, out]`: an einsum in the compute dtype of `x`;
- a composite weight (LoRA, DoRA, IA3, NF4, ...): any object that subclasses `Weight` and implements
  `apply(x, bias)`. Composite weights are registered pytrees (dataclasses), so they pass through `jit`, `grad`
  and `scan` as trees of arrays; the model code never learns which one it holds.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp


class Weight(abc.ABC):
    """A composite weight leaf: computes its product with `x` itself."""

    @abc.abstractmethod
    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        """Return `x @ W + bias` for this weight; `x[..., in] -> [..., out]` in `x.dtype`."""

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """The dense `[in, out]` matrix this weight stands for (used by merging and export)."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """The `[..., in, out]` shape of the dense weight."""


def dense(x: jax.Array, w: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """`x[..., in] @ w[in, out] + bias[out]`, computed in `x.dtype` (weights are cast, accumulation in fp32 on
    accelerators via XLA's default precision for the dtype)."""
    y = jnp.einsum("...i,io->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def linear(x: jax.Array, w: Any, bias: jax.Array | None = None) -> jax.Array:
    """`x @ w + bias` for a plain array or any composite `Weight` leaf. `x[..., in] -> [..., out]`."""
    if isinstance(w, Weight):
        return w.apply(x, bias)
    return dense(x, w, bias)


def materialize(w: Any) -> jax.Array:
    """The dense matrix behind a weight leaf (identity for plain arrays)."""
    return w.materialize() if isinstance(w, Weight) else w
