"""Merge an adapter into the base weights, and take it out again.

`merge(params, spec, adapter)` returns plain arrays in the tree and dtypes of `params`:

    LoRA / rsLoRA  W + s a b
    DoRA           (m / ||W + s a b||) * (W + s a b), per output feature (peft's merge); the bias is unchanged
    IA3            W scaled on its input rows (feedforward targets) or output columns, and then the bias too
    BitFit, modules_to_save: the adapter's copies replace the base values

`unmerge(merged, spec, adapter)` inverts the first three. DoRA's inverse needs the norms `||W + s a b||` of the
unmerged weight, which the merged weight no longer determines (peft caches them at merge time): pass
`dora_norms=dora_norms(params, spec, adapter)` computed before merging. Houlsby adapters are not linear in the
input and cannot be merged; BitFit and modules_to_save replace values and cannot be unmerged.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxft.ops.linear import materialize
from jaxft.peft.specs import BitFitSpec, DoraSpec, HoulsbySpec, IA3Spec, LoraSpec, PrefixTuningSpec, PromptTuningSpec
from jaxft.peft.targets import get_path, plan, set_path
from jaxft.peft.tree import _saved_paths, bind
from jaxft.peft.types import IA3, Dora, Lora


def _refuse(spec: Any, what: str) -> None:
    if isinstance(spec, HoulsbySpec):
        raise ValueError(f"{what}: Houlsby bottleneck adapters are not linear maps and cannot be merged; keep them "
                         "as an adapter")
    if isinstance(spec, (PromptTuningSpec, PrefixTuningSpec)):
        raise ValueError(f"{what}: {type(spec).__name__} adds inputs, not weights; there is nothing to merge")


def merge(params: dict, spec: Any, adapter: dict) -> dict:
    """`params` with the adapter folded into the weights: plain arrays, same tree and dtypes as `params`."""
    _refuse(spec, "merge")
    bound = bind(params, spec, adapter)
    out = bound
    for mp in plan(spec, params):
        node = get_path(out, mp.module.path)
        base = get_path(params, mp.module.path)
        w = node["kernel"]
        if isinstance(w, (Lora, Dora, IA3)):
            node["kernel"] = w.materialize().astype(base["kernel"].dtype)
        if isinstance(w, IA3) and "bias" in node:
            node["bias"] = w.merge_bias(node["bias"])
        if isinstance(spec, BitFitSpec):
            node["bias"] = node["bias"].astype(base["bias"].dtype)
    for path in _saved_paths(spec, params, type(spec).__name__):
        get_path(out, path[:-1])[path[-1]] = get_path(out, path).astype(get_path(params, path).dtype)
    return out


def dora_norms(params: dict, spec: DoraSpec, adapter: dict) -> dict:
    """`||W + s a b||` per output feature of every DoRA module, `[L, out]` fp32, in a tree like the adapter's
    (`tree[path]['kernel']`). Compute it from the base before merging; `unmerge` needs it."""
    out: dict = {}
    bound = bind(params, spec, adapter)
    for mp in plan(spec, params):
        w: Dora = get_path(bound, mp.module.path)["kernel"]
        norm = jnp.linalg.norm(materialize(w.base).astype(jnp.float32) + w._lora().delta(), axis=-2)
        set_path(out, (*mp.module.path, "kernel"), norm)
    return out


def unmerge(merged: dict, spec: Any, adapter: dict, *, dora_norms: dict | None = None) -> dict:
    """The base weights back from `merge(params, spec, adapter)` (computed in fp32, cast to the merged dtypes).

    DoRA needs `dora_norms` (see `dora_norms`). IA3 divides by the learned vector: entries equal to zero cannot be
    undone.
    """
    _refuse(spec, "unmerge")
    if isinstance(spec, BitFitSpec) or getattr(spec, "modules_to_save", ()):
        raise ValueError(f"unmerge: {type(spec).__name__} replaces base values (biases or modules_to_save), so the "
                         "merged tree no longer holds them; keep the base tree instead")
    if isinstance(spec, DoraSpec) and dora_norms is None:
        raise ValueError("unmerge: DoRA needs the row norms of the unmerged weight (peft caches them at merge "
                         "time): pass dora_norms=jaxft.peft.dora_norms(base_params, spec, adapter) computed before "
                         "merging")
    out = dict(merged)
    bound = bind(merged, spec, adapter)  # composites around the merged kernels: gives a, b, scale, vectors
    for mp in plan(spec, merged):
        path = mp.module.path
        node = dict(get_path(merged, path))
        w = get_path(bound, path)["kernel"]
        wm = node["kernel"].astype(jnp.float32)
        dtype = node["kernel"].dtype
        if isinstance(spec, LoraSpec):
            base = wm - w.delta()
        elif isinstance(spec, DoraSpec):
            norm = get_path(dora_norms, (*path, "kernel"))
            active = jnp.reshape(w.active, jnp.shape(w.active) + (1,))
            f = jnp.where(active, w.magnitude.astype(jnp.float32) / jnp.where(active, norm, 1.0), 1.0)
            base = wm / f[..., None, :] - w._lora().delta()
        elif isinstance(spec, IA3Spec):
            l = w.vector().astype(jnp.float32)
            base = wm / (l[..., :, None] if w.on_input else l[..., None, :])
            if not w.on_input and "bias" in node:
                node["bias"] = (node["bias"].astype(jnp.float32) / l).astype(node["bias"].dtype)
        else:
            raise ValueError(f"unmerge: {type(spec).__name__} is not a mergeable method")
        node["kernel"] = base.astype(dtype)
        _set_module(out, path, node)
    return out


def _set_module(tree: dict, path: tuple[str, ...], node: dict) -> None:
    """`tree[path] = node`, copying the dicts on the way (never mutating the caller's tree)."""
    for k in path[:-1]:
        tree[k] = dict(tree[k])
        tree = tree[k]
    tree[path[-1]] = node

