"""Houlsby bottleneck adapters: `Houlsby(base, down, down_bias, up, up_bias, activation)` on the output of the
targeted projections (default o_proj and down_proj: after the attention block and after the MLP).

Adapter entry: `{'down': [L, out, m], 'down_bias': [L, m], 'up': [L, m, out], 'up_bias': [L, out]}`; down N(0,
init_std), up zero, so the model is unchanged at initialisation. Not a linear map of the input: not mergeable. peft
has no such method: files go out in jaxft's own format (`peft_type` JAXFT_HOULSBY, dotted adapter-tree keys).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxft.peft.protocol import LinearMethod, OwnFormat, require_full, stack_shape
from jaxft.peft.specs import HoulsbySpec
from jaxft.peft.types import Houlsby


class HoulsbyMethod(OwnFormat, LinearMethod):
    name = "houlsby"
    spec = HoulsbySpec
    description = "Houlsby adapters"
    peft_type = "JAXFT_HOULSBY"
    not_mergeable = "are not linear maps and cannot be merged; keep them as an adapter"

    def init_module(self, spec, mp, node, key, dtype):
        require_full(mp, type(spec).__name__)
        d, m = mp.module.d_out, spec.bottleneck
        down = spec.init_std * jax.random.normal(key, (len(mp.active), d, m), jnp.float32)
        return {"down": (down if mp.module.stacked else down[0]).astype(dtype),
                "down_bias": jnp.zeros(stack_shape(mp, m), dtype),
                "up": jnp.zeros(stack_shape(mp, m, d), dtype),
                "up_bias": jnp.zeros(stack_shape(mp, d), dtype)}

    def entry_shapes(self, spec, mp):
        d, m = mp.module.d_out, spec.bottleneck
        return {"down": stack_shape(mp, d, m), "down_bias": stack_shape(mp, m), "up": stack_shape(mp, m, d),
                "up_bias": stack_shape(mp, d)}

    def entry_axes(self, spec, mp, axes):
        *lead, _, ax_out = axes
        return {"down": (*lead, ax_out, "bottleneck"), "down_bias": (*lead, "bottleneck"),
                "up": (*lead, "bottleneck", ax_out), "up_bias": (*lead, ax_out)}

    def bind_module(self, spec, mp, node, entry, key, train):
        return Houlsby(node["kernel"], entry["down"], entry["down_bias"], entry["up"], entry["up_bias"],
                       spec.activation)
