"""Weights that differ per batch row: the hook through which a per-row selector (an adapter id) reaches the product.

A multi-adapter batch (S-LoRA, Punica) runs one pass over rows that each name their own adapter. The adapters sit in
a fixed-capacity stack inside a composite weight, and which slice a row uses is an *input* of the call, not part of
the parameter tree's shapes: the same compiled function serves every mix of adapters. `RowWeight` is such a
weight; `bind_rows(params, rows)` gives every one of them the call's `rows[B]` (the model does this once per call,
before its layers), so `linear(x, w)` stays the one dispatch and the layers never see the ids.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

from jaxft.ops.linear import Weight


class RowWeight(Weight):
    """A composite weight whose product depends on a per-row selector `rows[B]` (int32) given per call."""

    @abc.abstractmethod
    def with_rows(self, rows: jax.Array) -> RowWeight:
        """This weight with `rows[B]` bound (a new leaf; arrays shared). The leaf broadcasts `rows` over its own
        leading (layer) axes so that `scan` over stacked layers slices it with the rest."""


def bind_rows(params: Any, rows: jax.Array | None) -> Any:
    """`params` with `rows[B]` bound into every `RowWeight` leaf (a pure tree transform; `params` as is when `rows`
    is None). Raises `ValueError` when `rows` is not one int per row."""
    if rows is None:
        return params
    rows = jnp.asarray(rows)
    if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
        raise ValueError(f"adapter_ids must be one integer per batch row, shape [B]; got {rows.dtype}{list(rows.shape)}")
    rows = rows.astype(jnp.int32)
    return jax.tree.map(lambda w: w.with_rows(rows) if isinstance(w, RowWeight) else w, params,
                        is_leaf=lambda w: isinstance(w, Weight))
