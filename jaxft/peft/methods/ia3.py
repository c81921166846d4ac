"""(IA)^3: `IA3(base, l, active, on_input)`, a learned vector scaling a module's output (bias included) or, for the
`feedforward_modules`, its input.

Adapter entry: `adapter[path]['kernel'] = {'ia3_l': [L, out]}` (`[L, in]` for feedforward targets), ones on
untransformed layers. peft's file holds `ia3_l [out, 1]`, or `[1, in]` for feedforward targets.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxft.peft import saved
from jaxft.peft.peft_fields import check_task, listify, refuse_options
from jaxft.peft.protocol import LinearMethod, TensorSlot, listed, per_instance, stack_shape
from jaxft.peft.specs import IA3Spec
from jaxft.peft.types import IA3

FIELDS = {"target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"}


def _dim(mp) -> int:
    return mp.module.d_in if mp.feedforward else mp.module.d_out


class IA3Method(LinearMethod):
    name = "ia3"
    spec = IA3Spec
    description = "IA3"
    mergeable = True
    weight_delta = True

    def init_module(self, spec, mp, node, key, dtype):
        return {"ia3_l": jnp.ones(stack_shape(mp, _dim(mp)), dtype)}

    def entry_shapes(self, spec, mp):
        return {"ia3_l": stack_shape(mp, _dim(mp))}

    def entry_axes(self, spec, mp, axes):
        *lead, ax_in, ax_out = axes
        return {"ia3_l": (*lead, ax_in if mp.feedforward else ax_out)}

    def bind_module(self, spec, mp, node, entry, key, train):
        return IA3(node["kernel"], entry["ia3_l"], jnp.asarray(per_instance(mp, mp.active)), mp.feedforward)

    def mask_module(self, spec, mp, entry):
        act = mp.active if mp.module.stacked else mp.active[0]
        return {"ia3_l": np.broadcast_to(np.reshape(act, np.shape(act) + (1,)), entry["ia3_l"].shape).copy()}

    def merge_module(self, spec, mp, node, base):
        w = node["kernel"]
        node["kernel"] = w.materialize().astype(base["kernel"].dtype)
        if "bias" in node:
            node["bias"] = w.merge_bias(node["bias"])

    def unmerge_module(self, spec, mp, node, bound, **kw):
        l = bound.vector().astype(jnp.float32)
        wm = node["kernel"].astype(jnp.float32)
        node["kernel"] = (wm / (l[..., :, None] if bound.on_input else l[..., None, :])).astype(node["kernel"].dtype)
        if not bound.on_input and "bias" in node:
            node["bias"] = (node["bias"].astype(jnp.float32) / l).astype(node["bias"].dtype)

    def tensor_slots(self, spec, mp, i):
        if mp.feedforward:
            return [TensorSlot("ia3_l", "ia3_l", (), (1, mp.module.d_in), _flat, _row)]
        return [TensorSlot("ia3_l", "ia3_l", (), (mp.module.d_out, 1), _flat, _column)]

    def empty_entry(self, spec, mp):
        lead = (len(mp.active),) if mp.module.stacked else ()
        return {"ia3_l": np.ones((*lead, _dim(mp)), np.float32)}

    def reads(self, cfg):
        return cfg.get("peft_type") == "IA3"

    def spec_from_config(self, cfg, where, tied):
        check_task(cfg, where)
        refuse_options(cfg, FIELDS, where)
        return IA3Spec(target_modules=listed(cfg.get("target_modules") or ("k_proj", "v_proj", "down_proj")),
                       feedforward_modules=listed(cfg.get("feedforward_modules") or ("down_proj",)),
                       exclude_modules=listed(cfg.get("exclude_modules")),
                       modules_to_save=saved.from_config(cfg, where, tied))

    def config_fields(self, spec, config, params):
        return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "inference_mode": True,
                "target_modules": listify(spec.target_modules),
                "feedforward_modules": listify(spec.feedforward_modules),
                "exclude_modules": listify(spec.exclude_modules),
                "modules_to_save": list(spec.modules_to_save) or None, "fan_in_fan_out": False}

    def serve_problems(self, spec, plans):
        return ["IA3: vLLM serves plain LoRA only; convert it with jaxft.peft.to_lora"] + saved.serve_problems(spec)


def _flat(v: np.ndarray) -> np.ndarray:
    return v.reshape(-1)


def _row(v: np.ndarray) -> np.ndarray:
    return v.reshape(1, -1)


def _column(v: np.ndarray) -> np.ndarray:
    return v.reshape(-1, 1)
