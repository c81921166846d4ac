"""LoRA (and rsLoRA): `Lora(base, a, b, scale)` on every targeted linear module.

Adapter entry of a module at `path`: `adapter[path]['kernel'] = {'lora_a': [L, in, R], 'lora_b': [L, R, out]}`,
R = the largest rank over the layers; smaller per-layer ranks are zero-padded and untransformed layers hold zeros
(their `scale` is 0), so those entries neither change the output nor receive gradient. peft's file holds each
layer's `lora_A.weight [r, in]` and `lora_B.weight [out, r]`, cut to its own rank.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError
from jaxft.peft import saved
from jaxft.peft.peft_fields import check_task, listify, number, refuse_options
from jaxft.peft.protocol import LinearMethod, TensorSlot, listed, per_instance, stack_shape
from jaxft.peft.specs import LoraSpec
from jaxft.peft.targets import ModulePlan, plan
from jaxft.peft.types import Lora
from jaxft.quant import compute_view

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the LoRA ranks vLLM serves
FIELDS = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "use_dora",
          "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"}


def rank_mask(mp: ModulePlan) -> np.ndarray:
    """`[n, R]` bool: rank slot k of instance i is used (k < rank[i])."""
    return np.arange(mp.max_rank)[None, :] < mp.rank[:, None]


class LowRank(LinearMethod):
    """What LoRA and DoRA share: the factors, their init, peft's LORA config, the rank checks of vLLM."""

    mergeable: ClassVar[bool] = True
    weight_delta: ClassVar[bool] = True
    use_dora: ClassVar[bool]

    def bind(self, spec, params, adapter, *, train=False, rng=None):
        # An NF4 base (QLoRA) enters the step with uint8 codes: bfloat16 storage is bitcast here, outside the scan.
        return compute_view(super().bind(spec, params, adapter, train=train, rng=rng))

    def init_module(self, spec, mp, node, key, dtype):
        n_in, n_out, r = mp.module.d_in, mp.module.d_out, mp.max_rank
        mask = rank_mask(mp)  # [n, R]
        if spec.init == "kaiming":
            # torch's kaiming_uniform_(a=sqrt(5)) on lora_A[r, in]: gain = sqrt(2 / (1 + a^2)) = sqrt(1/3),
            # bound = gain * sqrt(3 / fan_in) = 1 / sqrt(in) (nn.Linear's default init).
            bound = 1.0 / math.sqrt(n_in)
            a = jax.random.uniform(key, (len(mp.active), n_in, r), jnp.float32, -bound, bound)
        else:
            std = np.where(mp.rank > 0, 1.0 / np.maximum(mp.rank, 1), 0.0)  # peft: normal(std = 1 / r)
            a = jax.random.normal(key, (len(mp.active), n_in, r), jnp.float32) * std[:, None, None]
        a = jnp.where(mask[:, None, :], a, 0.0)
        out = {"lora_a": a.astype(dtype), "lora_b": jnp.zeros((len(mp.active), r, n_out), dtype)}
        out.update(self.extra_init(mp, node, dtype))
        if not mp.module.stacked:
            out = {k: v[0] for k, v in out.items()}
        return out

    def extra_init(self, mp: ModulePlan, node: dict, dtype) -> dict:
        """Entries beyond the factors, stacked `[n, ...]` (DoRA's magnitude)."""
        return {}

    def entry_shapes(self, spec, mp):
        r = mp.max_rank
        return {"lora_a": stack_shape(mp, mp.module.d_in, r), "lora_b": stack_shape(mp, r, mp.module.d_out)}

    def entry_axes(self, spec, mp, axes):
        *lead, ax_in, ax_out = axes
        return {"lora_a": (*lead, ax_in, "lora_rank"), "lora_b": (*lead, "lora_rank", ax_out)}

    def dropout_rate(self, spec):
        return spec.dropout

    def mask_module(self, spec, mp, entry):
        rank = rank_mask(mp) if mp.module.stacked else rank_mask(mp)[0]
        return {"lora_a": np.broadcast_to(rank[..., None, :], entry["lora_a"].shape).copy(),
                "lora_b": np.broadcast_to(rank[..., :, None], entry["lora_b"].shape).copy()}

    def merge_module(self, spec, mp, node, base):
        node["kernel"] = node["kernel"].materialize().astype(base["kernel"].dtype)

    def tensor_slots(self, spec, mp, i):
        r, d_in, d_out = int(mp.rank[i]), mp.module.d_in, mp.module.d_out
        return [TensorSlot("lora_A.weight", "lora_a", (slice(None), slice(0, r)), (r, d_in), _t, _t),
                TensorSlot("lora_B.weight", "lora_b", (slice(0, r),), (d_out, r), _t, _t)]

    def empty_entry(self, spec, mp):
        lead = (len(mp.active),) if mp.module.stacked else ()
        return {"lora_a": np.zeros((*lead, mp.module.d_in, mp.max_rank), np.float32),
                "lora_b": np.zeros((*lead, mp.max_rank, mp.module.d_out), np.float32)}

    # ---- peft config ----
    def reads(self, cfg):
        return cfg.get("peft_type") == "LORA" and bool(cfg.get("use_dora", False)) == self.use_dora

    def spec_from_config(self, cfg, where, tied):
        check_task(cfg, where)
        refuse_options(cfg, FIELDS, where)
        init = cfg.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"{where}: init_lora_weights={init!r} is not supported (it rewrites the base weights "
                              "or needs a conversion); only true, false and 'gaussian' adapters load")
        layers = cfg.get("layers_to_transform")
        return self.spec(
            r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=listed(cfg.get("target_modules") or ("q_proj", "v_proj")),
            exclude_modules=listed(cfg.get("exclude_modules")), use_rslora=bool(cfg.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming", rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            layers_to_transform=None if layers in (None, []) else ((layers,) if isinstance(layers, int) else layers),
            modules_to_save=saved.from_config(cfg, where, tied))

    def config_fields(self, spec, config, params):
        targets = spec.target_modules
        if targets == "all-linear":  # peft stores the expanded names too; vLLM needs them
            targets = sorted({mp.module.path[-1] for mp in plan(spec, params)})
        names = list(spec.modules_to_save)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "inference_mode": True,
            "r": spec.r, "lora_alpha": number(spec.alpha), "lora_dropout": spec.dropout,
            "target_modules": listify(targets), "exclude_modules": listify(spec.exclude_modules),
            "use_rslora": spec.use_rslora, "use_dora": self.use_dora,
            "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
            "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": {k: number(v) for k, v in spec.alpha_pattern},
            "layers_to_transform": listify(spec.layers_to_transform), "layers_pattern": None,
            "modules_to_save": names or None,
            "ensure_weight_tying": config.tie_word_embeddings and "embed_tokens" in names, "bias": "none",
            "fan_in_fan_out": False,
        }

    # ---- serving ----
    def serve_problems(self, spec, plans):
        out = self.kind_problems()
        plans = plans or []
        ranks = {spec.r} | {int(r) for mp in plans for r, a in zip(mp.rank, mp.active) if a}
        bad = sorted(r for r in ranks if r not in VLLM_RANKS)
        if bad:
            out.append(f"rank {', '.join(map(str, bad))}: vLLM accepts ranks {', '.join(map(str, VLLM_RANKS))} "
                       "(jaxft.peft.to_lora re-expresses the adapter at another rank)")
        scales = {float(s) for mp in plans for s, a in zip(mp.scale, mp.active) if a}
        if len(scales) > 1:
            out.append("rank_pattern/alpha_pattern give modules different scales; vLLM applies lora_alpha / r to "
                       "every module (jaxft.peft.to_lora gives one rank and scale)")
        return out + saved.serve_problems(spec)

    @abc.abstractmethod
    def kind_problems(self) -> list[str]:
        """What vLLM refuses in the method itself (nothing for LoRA)."""


def _t(v: np.ndarray) -> np.ndarray:
    return v.T


class LoraMethod(LowRank):
    name = "lora"
    spec = LoraSpec
    description = "LoRA"
    use_dora = False

    def bind_module(self, spec, mp, node, entry, key, train):
        scale = jnp.asarray(per_instance(mp, mp.scale), jnp.float32)
        return Lora(node["kernel"], entry["lora_a"], entry["lora_b"], scale, key, spec.dropout if train else 0.0)

    def unmerge_module(self, spec, mp, node, bound, **kw):
        node["kernel"] = (node["kernel"].astype(jnp.float32) - bound.delta()).astype(node["kernel"].dtype)

    def kind_problems(self):
        return []
