"""Merge an adapter into the base weights, and take it out again.

`merge(params, spec, adapter)` returns plain arrays in the tree and dtypes of `params`:

    LoRA / rsLoRA  W + s a b
    DoRA           (m / ||W + s a b||) * (W + s a b), per output feature (peft's merge); the bias is unchanged
    IA3            W scaled on its input rows (feedforward targets) or output columns, and then the bias too
    BitFit, modules_to_save: the adapter's copies replace the base values

An NF4-quantised base (QLoRA) is dequantised: every `NF4Tensor` leaf, adapted or not, comes out dense in the
dtype it stands for. `unmerge` refuses a tree holding one (NF4 cannot hold `W - s a b`; unmerge the dense merge).

`unmerge(merged, spec, adapter)` inverts the first three. DoRA's inverse needs the norms `||W + s a b||` of the
unmerged weight, which the merged weight no longer determines (peft caches them at merge time): pass
`dora_norms=dora_norms(params, spec, adapter)` computed before merging. Houlsby adapters are not linear in the
input and cannot be merged; BitFit and modules_to_save replace values and cannot be unmerged.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxft.errors import UnsupportedConfigError
from jaxft.ops.linear import materialize
from jaxft.peft.methods.dora import dora_norms
from jaxft.peft.registry import method_for
from jaxft.quant import NF4Tensor, nf4_leaves

__all__ = ["dora_norms", "merge", "mergeable", "unmerge"]


def mergeable(spec: Any) -> bool:
    """Whether `merge` folds this spec's adapters into plain weights (not Houlsby, prompt or prefix tuning)."""
    return method_for(spec).mergeable


def merge(params: dict, spec: Any, adapter: dict) -> dict:
    """`params` with the adapter folded into the weights: plain arrays, same tree and dtypes as `params` (an NF4
    leaf becomes the dense array of its `dtype`)."""
    method = method_for(spec)
    if not method.mergeable:
        return method.merge(spec, params, adapter, params)  # raises, naming the method
    merged = method.merge(spec, params, adapter, method.bind(spec, params, adapter, train=False, rng=None))
    is_nf4 = lambda x: isinstance(x, NF4Tensor)  # noqa: E731
    return jax.tree.map(lambda x: materialize(x) if is_nf4(x) else x, merged, is_leaf=is_nf4)


def unmerge(merged: dict, spec: Any, adapter: dict, *, dora_norms: dict | None = None) -> dict:
    """The base weights back from `merge(params, spec, adapter)` (computed in fp32, cast to the merged dtypes).

    DoRA needs `dora_norms` (see `dora_norms`). IA3 divides by the learned vector: entries equal to zero cannot be
    undone.
    """
    quantized = nf4_leaves(merged)
    if quantized:
        raise UnsupportedConfigError(
            f"unmerge: {quantized[0]} is an NF4Tensor (a quantised base); NF4 cannot hold W - s a b exactly, and "
            "merge never returns NF4 (it dequantises): unmerge the dense tree that merge returned")
    kw = {} if dora_norms is None else {"dora_norms": dora_norms}
    return method_for(spec).unmerge(spec, merged, adapter, **kw)
