"""Adapter arithmetic on whole adapters: peft's `add_weighted_adapter` over every module of a model.

`add_weighted_adapter(specs, adapters, weights, combination_type, params=..., **options)` combines LoRA adapter
trees module by module with `jaxft.peft.combine.combine_lora` (see there for what each combination type computes and
how it matches peft) and returns the new `(LoraSpec, adapter)`. Every input must be plain LoRA (rsLoRA allowed) with
one rank and one scale per module over all layers, and all inputs must adapt the same modules; DoRA, IA3 and
irregular adapters convert first with `jaxft.peft.to_lora`.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.peft.combine import COMBINATION_TYPES, LoraFactors, combine_lora
from jaxft.peft.specs import LoraSpec
from jaxft.peft.targets import ModulePlan, get_path, plan, set_path


def _module_factors(spec: LoraSpec, adapter: dict, mp: ModulePlan, i: int) -> LoraFactors:
    where = f"add_weighted_adapter: adapter {i}, {mp.module.short}"
    if not mp.active.all():
        raise ConfigError(f"{where}: adapts only some layers (layers_to_transform or a regex target); combine "
                          "adapters that cover every layer of a module")
    ranks, scales = set(mp.rank.tolist()), set(mp.scale.tolist())
    if len(ranks) > 1 or len(scales) > 1:
        raise ConfigError(f"{where}: ranks {sorted(ranks)} / scales {sorted(scales)} differ between layers "
                          "(rank_pattern / alpha_pattern); re-express it with jaxft.peft.to_lora first")
    node = get_path(adapter, (*mp.module.path, "kernel"))
    if node is None or "lora_a" not in node:
        raise ConfigError(f"{where}: the adapter tree has no LoRA factors there; it was not made for this spec")
    return LoraFactors(node["lora_a"], node["lora_b"], float(mp.scale[0]), spec.alpha, spec.use_rslora)


def add_weighted_adapter(specs: LoraSpec | Sequence[LoraSpec], adapters: Sequence[dict], weights: Sequence[float],
                         combination_type: str = "svd", *, params: dict, drop_masks: dict | None = None,
                         key: jax.Array | None = None, **options: Any) -> tuple[LoraSpec, dict]:
    """Combine whole LoRA adapters as peft's `model.add_weighted_adapter(names, weights, new, combination_type,
    **options)` does, returning `(spec, adapter)` of the new adapter.

    specs: one `LoraSpec` per adapter (or one for all); adapters: their trees (from `init` or `load_adapter`), all on
    `params` (the base tree, or its `abstract_params`). options: `density`, `majority_sign_method`, `svd_rank`,
    `svd_clamp`, `svd_full_matrices`, `match_peft_rslora` as in `combine_lora`. DARE types draw their masks from
    `key`, or take `drop_masks[module]` (module = the dotted tree path, e.g. 'model.layers.self_attn.q_proj') in
    `combine_lora`'s per-module format.

    The new spec has `r` = the combined rank (`linear`-like: the common rank; `cat`: the sum; svd types: `svd_rank`
    or the largest), `alpha` such that its scale is 1 (peft folds every scale into the factors), the adapted module
    names as targets, and `use_rslora` of the first adapter.
    """
    if combination_type not in COMBINATION_TYPES:
        raise ConfigError(f"add_weighted_adapter: invalid combination_type {combination_type!r}; use one of "
                          f"{', '.join(COMBINATION_TYPES)}")
    specs = [specs] * len(adapters) if isinstance(specs, LoraSpec) else list(specs)
    if len(specs) != len(adapters) or len(weights) != len(adapters) or not adapters:
        raise ConfigError(f"add_weighted_adapter: got {len(specs)} specs, {len(adapters)} adapters and "
                          f"{len(weights)} weights; pass one of each per adapter")
    for i, spec in enumerate(specs):
        if type(spec) is not LoraSpec:
            raise ConfigError(f"add_weighted_adapter: adapter {i} is a {type(spec).__name__}; only LoRA adapters "
                              "combine (convert others with jaxft.peft.to_lora)")
        if spec.modules_to_save:
            raise ConfigError(f"add_weighted_adapter: adapter {i} has modules_to_save {list(spec.modules_to_save)}, "
                              "which peft refuses to combine")
    plans = [{mp.module.path: mp for mp in plan(spec, params)} for spec in specs]
    paths = list(plans[0])
    for i, p in enumerate(plans[1:], 1):
        if set(p) != set(paths):
            diff = sorted(".".join(x) for x in set(p) ^ set(paths))
            raise ConfigError(f"add_weighted_adapter: adapter {i} and adapter 0 adapt different modules ({diff[0]}"
                              f"{' and more' if len(diff) > 1 else ''}); combine adapters with the same targets")
    out: dict = {}
    ranks: dict[tuple[str, ...], int] = {}
    first = None
    for path in paths:
        ins = [_module_factors(spec, adapter, p[path], i)
               for i, (spec, adapter, p) in enumerate(zip(specs, adapters, plans))]
        name = ".".join(path)
        masks = None if drop_masks is None else drop_masks.get(name)
        k = None if key is None else jax.random.fold_in(key, len(ranks))
        new = combine_lora(ins, weights, combination_type, drop_masks=masks, key=k if masks is None else None,
                           **options)
        set_path(out, (*path, "kernel"), {"lora_a": jnp.asarray(new.a), "lora_b": jnp.asarray(new.b)})
        ranks[path] = new.rank
        first = first or new
    rank = collections.Counter(ranks.values()).most_common(1)[0][0]
    targets = tuple(sorted({p[-1] for p in paths}))
    # every module's scale is folded into its factors: alpha makes scale 1 (rsLoRA: alpha / sqrt(r) = 1)
    alpha_of = (lambda r: r ** 0.5) if first.rslora and first.scale == 1.0 else float
    rank_pattern = {".".join(p[2:] if p[:2] == ("model", "layers") else p): r for p, r in ranks.items() if r != rank}
    spec = LoraSpec(r=rank, alpha=alpha_of(rank), target_modules=targets, use_rslora=first.rslora,
                    rank_pattern=rank_pattern, alpha_pattern={k: alpha_of(r) for k, r in rank_pattern.items()})
    return spec, out
