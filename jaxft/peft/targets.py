"""Which modules an adapter touches, layer by layer, decided from the parameter tree and a spec with peft's rules.

The parameter tree stacks the decoder layers on a leading axis, but peft decides per module name
(`model.layers.3.self_attn.q_proj`): targets, `exclude_modules`, `layers_to_transform`, `rank_pattern` and
`alpha_pattern` can differ from one layer to the next. `plan(spec, params)` evaluates them per layer and returns one
`ModulePlan` per stacked module: which layers are transformed (`active[L]`), the rank and the scaling of each layer.
A stacked adapter is then exact with zero padding to the largest rank and a zero scale on untransformed layers.

Works on any tree whose leaves have `.shape` (arrays, composite weights, `jax.ShapeDtypeStruct`, `ParamSpec`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterator

import numpy as np

from jaxft.peft.specs import ALL_LINEAR, Targets
from jaxft.schema import ConfigError

LAYERS = ("model", "layers")
HEAD = "lm_head"


@dataclasses.dataclass(frozen=True)
class Module:
    """One linear module of the tree: `path` to its dict (holding `kernel[..., in, out]`, maybe `bias`), the HF
    names of its per-layer instances (one name when not stacked)."""

    path: tuple[str, ...]
    names: tuple[str, ...]
    stacked: bool
    d_in: int
    d_out: int
    has_bias: bool

    @property
    def short(self) -> str:
        """The name without the layer prefix (`self_attn.q_proj`, `lm_head`)."""
        return ".".join(self.path[2:] if self.stacked else self.path)


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """What an adapter does to one module: `active[n]` per instance (n = L when stacked, else 1), `rank[n]` (0 where
    inactive), `scale[n]` (0.0 where inactive) and `feedforward` (IA3: scale the input)."""

    module: Module
    active: np.ndarray
    rank: np.ndarray
    scale: np.ndarray
    alpha: np.ndarray
    feedforward: bool = False

    @property
    def max_rank(self) -> int:
        return int(self.rank.max())


def _node(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def linear_modules(params: dict) -> list[Module]:
    """Every linear module (a dict with a `kernel`) of a parameter tree, layers first, in tree order."""
    out: list[Module] = []

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        if "kernel" in node:
            shape = tuple(node["kernel"].shape)
            stacked = path[:2] == LAYERS
            if stacked:
                rest = ".".join(path[2:])
                names = tuple(f"model.layers.{i}.{rest}" for i in range(shape[0]))
            else:
                names = (".".join(path),)
            out.append(Module(path, names, stacked, shape[-2], shape[-1], "bias" in node))
            return
        for k in node:
            visit(node[k], (*path, k))

    visit(params, ())
    return out


def other_modules(params: dict) -> list[str]:
    """HF names of the modules that are not linear (embeddings, norms), one per stacked layer as well."""
    names = ["model.embed_tokens", "model.norm"]
    layers = params.get("model", {}).get("layers", {})
    num = next((int(v.shape[0]) for k, v in layers.get("input_layernorm", {}).items()), 0)
    for i in range(num):
        names += [f"model.layers.{i}.input_layernorm", f"model.layers.{i}.post_attention_layernorm"]
    return names


def _matches(targets: Targets, name: str) -> bool:
    """peft's `check_target_module_exists` rule for one name (without layer filtering)."""
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            return name != HEAD
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _is_feedforward(ff: Targets, name: str) -> bool:
    """peft's IA3 rule: a regex string must match the whole name; a listed name is a plain suffix (no dot)."""
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name.endswith(t) for t in ff)


def _pattern_value(pattern: tuple[tuple[str, float], ...], name: str, default: float) -> float:
    """peft's `get_pattern_key`: the first key `k` with `re.match(rf"(.*\\.)?({k})$", name)` wins."""
    for key, value in pattern:
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _layer_index(name: str) -> int | None:
    m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    return int(m.group("idx")) if m else None


def describe_modules(params: dict) -> str:
    """One line listing the module names of the tree (layer modules once, with `N` for the layer index)."""
    mods = linear_modules(params)
    names = [f"model.layers.N.{m.short}" if m.stacked else m.names[0] for m in mods]
    return ", ".join(names)


def _check_targets(targets: Targets, params: dict, modules: list[Module], field: str, where: str,
                   linear_only: bool = True) -> None:
    """Every listed target (or the regex) must match at least one module; else say which modules exist."""
    all_names = [n for m in modules for n in m.names]
    other = other_modules(params)
    listed = [targets] if isinstance(targets, str) else list(targets)
    for t in listed:
        probe = t if isinstance(targets, str) else (t,)
        if any(_matches(probe, n) for n in all_names):
            continue
        hit_other = [n for n in other if _matches(probe, n)]
        if hit_other and linear_only:
            raise ConfigError(f"{where}.{field}: '{t}' matches only {hit_other[0]}, which is not a linear layer; "
                              "train embeddings with modules_to_save=['embed_tokens']")
        tied = " (this model ties lm_head to embed_tokens)" if t.split(".")[-1] == HEAD else ""
        raise ConfigError(f"{where}.{field}: '{t}' matches no module{tied}; the modules are: "
                          f"{describe_modules(params)}")


def _excluded(spec: Any, name: str) -> bool:
    excl = getattr(spec, "exclude_modules", None)
    if excl and _matches(excl, name):
        return True
    saved = getattr(spec, "modules_to_save", ())
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved)


def plan(spec: Any, params: dict, where: str | None = None) -> list[ModulePlan]:
    """Per-module, per-layer decisions of `spec` on `params`, read from the spec's fields: `target_modules`,
    `exclude_modules`, `modules_to_save`, `layers_to_transform`, ranks and scales where it has `r` /
    `rank_pattern` / `alpha_pattern`, `feedforward_modules`, and `biases_only` (only modules with a bias; target
    'all' = all of them).

    Only modules with at least one transformed instance are returned. Raises `ConfigError` when a target matches
    no module (listing the modules that exist) or a layer index is out of range.
    """
    where = where or type(spec).__name__
    modules = linear_modules(params)
    targets = spec.target_modules
    if getattr(spec, "biases_only", False):
        modules = [m for m in modules if m.has_bias]
        if not modules:
            raise ConfigError(f"{where}: the model has no bias terms (BitFit trains only existing biases); use "
                              "LoRA or IA3 on this model")
        if targets == "all":
            targets = ALL_LINEAR
    _check_targets(targets, params, modules, "target_modules", where)
    layers = getattr(spec, "layers_to_transform", None)
    if layers is not None:
        num = max((len(m.names) for m in modules if m.stacked), default=0)
        bad = [i for i in layers if not 0 <= i < num]
        if bad:
            raise ConfigError(f"{where}.layers_to_transform: layer {bad[0]} is out of range (the model has {num} "
                              "layers)")
    lowrank = hasattr(spec, "rank_pattern")
    out = []
    for m in modules:
        n = len(m.names)
        active, rank, alpha = np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.float64)
        for i, name in enumerate(m.names):
            if _excluded(spec, name) or not _matches(targets, name):
                continue
            if layers is not None and _layer_index(name) not in layers:
                continue
            active[i] = True
            if lowrank:
                rank[i] = int(_pattern_value(spec.rank_pattern, name, spec.r))
                alpha[i] = float(_pattern_value(spec.alpha_pattern, name, spec.alpha))
        if not active.any():
            continue
        scale = np.zeros(n, np.float64)
        if lowrank:
            scale = np.array([spec.scaling(int(r), a) if r else 0.0 for r, a in zip(rank, alpha)])
        ff = False
        if getattr(spec, "feedforward_modules", None) is not None:
            ff_flags = {_is_feedforward(spec.feedforward_modules, nm) for nm, a in zip(m.names, active) if a}
            if len(ff_flags) > 1:
                raise ConfigError(f"{where}.feedforward_modules: matches some layers of {m.short} but not others; "
                                  "stacked layers need one choice per module")
            ff = ff_flags.pop()
        if m.d_in <= 0 or m.d_out <= 0:
            raise ConfigError(f"{where}: module {m.short} has an empty kernel")
        out.append(ModulePlan(m, active, rank, scale, alpha, ff))
    return out


def module_node(params: dict, mp: ModulePlan) -> dict:
    """The module dict (`{'kernel': ..., 'bias'?: ...}`) of `mp` in `params`."""
    return _node(params, mp.module.path)


def iter_instances(mp: ModulePlan) -> Iterator[tuple[int, str]]:
    """`(index along the stack, HF module name)` of every transformed instance."""
    for i, (name, a) in enumerate(zip(mp.module.names, mp.active)):
        if a:
            yield i, name


def set_path(tree: dict, path: tuple[str, ...], value: Any) -> None:
    """`tree[path[0]]...[path[-1]] = value`, creating dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple[str, ...], default: Any = None) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return default
        tree = tree[k]
    return tree

