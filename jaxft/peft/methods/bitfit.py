"""BitFit: only the model's existing biases train. The adapter holds a copy of each targeted bias at the base
tree's path (`adapter[path]['bias']`), which replaces the base bias in `bind`; merging writes it into the tree (no
unmerge: the base value is gone). peft has no such method: files go out in jaxft's own format (`peft_type`
JAXFT_BITFIT, dotted adapter-tree keys)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxft.peft.protocol import LinearMethod, OwnFormat, require_full
from jaxft.peft.specs import BitFitSpec


class BitFitMethod(OwnFormat, LinearMethod):
    name = "bitfit"
    spec = BitFitSpec
    description = "BitFit"
    mergeable = True
    peft_type = "JAXFT_BITFIT"
    kernel_leaf = "bias"

    def init_module(self, spec, mp, node, key, dtype):
        require_full(mp, type(spec).__name__)
        return jnp.asarray(node["bias"], dtype)

    def entry_axes(self, spec, mp, axes):
        *lead, _, ax_out = axes
        return (*lead, ax_out)

    def bind_module(self, spec, mp, node, entry, key, train):
        return entry

    def merge_module(self, spec, mp, node, base):
        node["bias"] = node["bias"].astype(base["bias"].dtype)

    def unmerge(self, spec, merged, adapter, **kw):
        raise ValueError(f"unmerge: {type(spec).__name__} replaces base values (biases or modules_to_save), so the "
                         "merged tree no longer holds them; keep the base tree instead")
