"""DoRA: `Dora(base, a, b, magnitude, scale, active)`, LoRA's factors plus a trained magnitude per output feature.

Adapter entry: LoRA's `{'lora_a', 'lora_b'}` + `'magnitude': [L, out]`, initialised to the column norms of the base
(`||W + s B A||` with B zero; computed layer by layer, so an NF4 base is dequantised one layer at a time, as the
forward pass does inside the layer scan); untransformed layers keep the base norm and `active` False. peft's file adds
`lora_magnitude_vector [out]` (no `.weight`). Merging folds `m / ||W + s a b||` into the weight; unmerging needs those
norms of the unmerged weight (`dora_norms`), which the merged weight no longer determines.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.ops.linear import materialize
from jaxft.peft.methods.lora import LowRank
from jaxft.peft.protocol import TensorSlot, per_instance, stack_shape
from jaxft.peft.specs import DoraSpec
from jaxft.peft.targets import get_path, plan, set_path
from jaxft.peft.types import Dora
from jaxft.quant import compute_view


class DoraMethod(LowRank):
    name = "dora"
    spec = DoraSpec
    description = "DoRA"
    use_dora = True

    def extra_init(self, mp, node, dtype):
        # One layer at a time: an NF4 base (QLoRA) is dequantised per layer, never as a whole stack.
        def col_norm(w):
            return jnp.linalg.norm(materialize(w).astype(jnp.float32), axis=-2)
        kernel = compute_view(node["kernel"])
        norm = jax.lax.map(col_norm, kernel) if mp.module.stacked else col_norm(kernel)
        return {"magnitude": norm.reshape(len(mp.active), mp.module.d_out).astype(dtype)}

    def entry_shapes(self, spec, mp):
        return {**super().entry_shapes(spec, mp), "magnitude": stack_shape(mp, mp.module.d_out)}

    def entry_axes(self, spec, mp, axes):
        *lead, _, ax_out = axes
        return {**super().entry_axes(spec, mp, axes), "magnitude": (*lead, ax_out)}

    def bind_module(self, spec, mp, node, entry, key, train):
        scale = jnp.asarray(per_instance(mp, mp.scale), jnp.float32)
        active = jnp.asarray(per_instance(mp, mp.active))
        return Dora(node["kernel"], entry["lora_a"], entry["lora_b"], entry["magnitude"], scale, active, key,
                    spec.dropout if train else 0.0)

    def mask_module(self, spec, mp, entry):
        out = super().mask_module(spec, mp, entry)
        act = mp.active if mp.module.stacked else mp.active[0]
        out["magnitude"] = np.broadcast_to(np.reshape(act, np.shape(act) + (1,)), entry["magnitude"].shape).copy()
        return out

    def unmerge_module(self, spec, mp, node, bound, *, dora_norms=None, **kw):
        if dora_norms is None:
            raise ValueError("unmerge: DoRA needs the row norms of the unmerged weight (peft caches them at merge "
                             "time): pass dora_norms=jaxft.peft.dora_norms(base_params, spec, adapter) computed "
                             "before merging")
        norm = get_path(dora_norms, (*mp.module.path, "kernel"))
        active = jnp.reshape(bound.active, jnp.shape(bound.active) + (1,))
        f = jnp.where(active, bound.magnitude.astype(jnp.float32) / jnp.where(active, norm, 1.0), 1.0)
        wm = node["kernel"].astype(jnp.float32)
        node["kernel"] = (wm / f[..., None, :] - bound.lora().delta()).astype(node["kernel"].dtype)

    def tensor_slots(self, spec, mp, i):
        return super().tensor_slots(spec, mp, i) + [
            TensorSlot("lora_magnitude_vector", "magnitude", (), (mp.module.d_out,), _same, _same)]

    def empty_entry(self, spec, mp):
        lead = (len(mp.active),) if mp.module.stacked else ()
        return {**super().empty_entry(spec, mp), "magnitude": np.zeros((*lead, mp.module.d_out), np.float32)}

    def kind_problems(self):
        return ["DoRA: vLLM serves plain LoRA only; convert it with jaxft.peft.to_lora"]


def _same(v: np.ndarray) -> np.ndarray:
    return v


def dora_norms(params: dict, spec: DoraSpec, adapter: dict) -> dict:
    """`||W + s a b||` per output feature of every DoRA module, `[L, out]` fp32, in a tree like the adapter's
    (`tree[path]['kernel']`). Compute it from the base before merging; `unmerge` needs it."""
    out: dict = {}
    bound = DoraMethod().bind(spec, params, adapter)
    for mp in plan(spec, params):
        w: Dora = get_path(bound, mp.module.path)["kernel"]
        norm = jnp.linalg.norm(materialize(w.base).astype(jnp.float32) + w.lora().delta(), axis=-2)
        set_path(out, (*mp.module.path, "kernel"), norm)
    return out
