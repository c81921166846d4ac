"""The serving path: what vLLM will not load, and `to_lora`, which turns any mergeable adapter into a plain LoRA.

vLLM serves plain LoRA only: no DoRA, IA3 or prompt methods, ranks in {1, 8, 16, 32, 64, 128, 256, 320, 512}, no
`modules_to_save`, `bias='none'`, and one scaling `lora_alpha / r` for every module (so per-module
`rank_pattern` / `alpha_pattern` scales are not honoured). `to_lora` re-expresses a DoRA, IA3 or irregular LoRA
adapter as a LoRA of one chosen rank by truncated SVD of each module's merged delta, reporting the relative error.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxft.peft.merge import merge
from jaxft.peft.methods.lora import VLLM_RANKS
from jaxft.peft.registry import method_for
from jaxft.peft.specs import LoraSpec
from jaxft.peft.svd import to_lora as svd_to_lora
from jaxft.peft.targets import ModulePlan, get_path, plan, set_path

__all__ = ["VLLM_RANKS", "to_lora", "vllm_warnings"]


def vllm_warnings(spec: Any, plans: list[ModulePlan] | None = None) -> list[str]:
    """The reasons vLLM will not serve an adapter of `spec` (empty when it will). `plans` (from
    `jaxft.peft.targets.plan`) adds the per-layer checks: every rank used, one scaling for all modules."""
    return method_for(spec).serve_problems(spec, plans)


def to_lora(spec: Any, adapter: dict, params: dict, rank: int, *, alpha: float | None = None
            ) -> tuple[LoraSpec, dict, dict[str, np.ndarray]]:
    """A plain LoRA of rank `rank` standing for a LoRA/rsLoRA/DoRA/IA3 adapter: per module, the truncated SVD of
    `merge(W) - W` (optimal in Frobenius norm).

    Returns `(lora_spec, lora_adapter, rel_error)` where `rel_error[module name]` is
    `||delta - scale * a b||_F / ||delta||_F` per layer (`[L]`, 0 where the delta is 0). `alpha=None` puts
    everything in the factors (`lora_alpha = rank`, scale 1); otherwise `scale = alpha / rank`. modules_to_save
    copies are carried over. A change of bias (IA3 on a module with a bias) cannot be carried by a LoRA and is
    refused.
    """
    if not method_for(spec).weight_delta:
        raise ValueError(f"to_lora: {type(spec).__name__} is not a weight delta (only LoRA, DoRA and IA3 adapters "
                         "convert)")
    merged = merge(params, spec, adapter)
    plans = plan(spec, params)
    out: dict = {}
    errors: dict[str, np.ndarray] = {}
    for mp in plans:
        path = mp.module.path
        base, new = get_path(params, path), get_path(merged, path)
        if "bias" in base and not np.array_equal(np.asarray(base["bias"]), np.asarray(new["bias"])):
            raise ValueError(f"to_lora: the adapter changes the bias of {mp.module.short} (IA3 scales the output, "
                             "bias included); a LoRA cannot carry a bias change")
        delta = new["kernel"].astype(jnp.float32) - jnp.asarray(base["kernel"], jnp.float32)
        a, b, scale, err = svd_to_lora(delta, rank, alpha=alpha)
        set_path(out, (*path, "kernel"), {"lora_a": a, "lora_b": b})
        errors[".".join(path)] = np.asarray(err)
    for saved in ("embed_tokens", "lm_head"):
        tpath = ("model", "embed_tokens", "weight") if saved == "embed_tokens" else ("lm_head", "kernel")
        if get_path(adapter, tpath) is not None:
            set_path(out, tpath, get_path(adapter, tpath))
    lora_alpha = float(rank) if alpha is None else float(alpha)
    new_spec = LoraSpec(r=rank, alpha=lora_alpha, target_modules=tuple(sorted({mp.module.path[-1] for mp in plans})),
                        modules_to_save=tuple(getattr(spec, "modules_to_save", ())))
    _check_same_modules(new_spec, plans, params)
    return new_spec, out, errors


def _check_same_modules(new_spec: LoraSpec, plans: list[ModulePlan], params: dict) -> None:
    """The plain spec must target exactly the converted modules (a short name may also exist elsewhere)."""
    got = {mp.module.path for mp in plan(new_spec, params)}
    want = {mp.module.path for mp in plans}
    if got != want:
        extra = sorted(".".join(p) for p in got - want)
        raise ValueError(f"to_lora: the plain LoRA spec would also target {', '.join(extra)}; convert adapters "
                         "whose targets are distinct module names")
