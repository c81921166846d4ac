"""Logical axes -> mesh axes: the one table from which parameter, adapter, optimizer-state and gradient shardings
are derived.

Every parameter declares logical axis names where it is defined (`jaxft.models.params`: `('layers', 'embed',
'q_heads')` for `q_proj.kernel`); a PEFT method derives its leaves' axes from the base kernel's
(`jaxft.peft.logical_axes`: LoRA's A takes the kernel's input axis, B its output axis). A `Rules` table maps each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated); a name it does not list is replicated.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

import jax
from jax.sharding import PartitionSpec

from jaxft.errors import ConfigError

# The axes of every jaxft mesh, in order (a size-1 axis costs nothing).
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axes of parameters (jaxft.models.params) and adapters (jaxft.peft methods).
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm", "lora_rank",
                "bottleneck", "virtual_tokens")

# The mesh axes a batch's leading (row) dimension is split over: every data-parallel axis.
BATCH_AXES = ("data", "fsdp")

Rules = Mapping[str, tuple[str, ...]]

PRESETS: dict[str, dict[str, Any]] = {
    # ZeRO-3: every weight matrix split on its model dimension (embed); norms, ranks and the like replicated.
    "fsdp": {"embed": "fsdp"},
    # Megatron: column-parallel q/k/v/gate/up (output heads / columns), row-parallel o/down, vocab-parallel
    # embedding and head.
    "tensor": {"q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
    # Pure data parallelism: every parameter replicated.
    "data": {},
    "fsdp+tensor": {"embed": "fsdp", "q_heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}


def resolve_rules(rules: str | Mapping[str, Any], where: str = "parallel.rules") -> dict[str, tuple[str, ...]]:
    """The table `{logical axis: tuple of mesh axes}` of a preset name or a user table (values: a mesh axis name, a
    list of them, or None). Refuses an unknown preset, logical axis or mesh axis, and one logical axis listing a
    mesh axis twice, each with a one-line `ConfigError` naming `where`. Two logical axes may share a mesh axis
    (q_heads and kv_heads on tensor) as long as no array has both: `logical_to_spec` refuses that array."""
    if isinstance(rules, str):
        if rules not in PRESETS:
            close = difflib.get_close_matches(rules, PRESETS, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "or give a table {logical axis: mesh axis}"
            raise ConfigError(f"{where}: unknown preset '{rules}'; presets: {', '.join(PRESETS)}; {hint}")
        return resolve_rules(PRESETS[rules], where)
    if not isinstance(rules, Mapping):
        raise ConfigError(f"{where}: expected a preset name or a table {{logical axis: mesh axis}}, got {rules!r}")
    out: dict[str, tuple[str, ...]] = {}
    for logical, target in rules.items():
        if logical not in LOGICAL_AXES:
            close = difflib.get_close_matches(str(logical), LOGICAL_AXES, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"logical axes: {', '.join(LOGICAL_AXES)}"
            raise ConfigError(f"{where}.{logical}: unknown logical axis; {hint}")
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        for a in axes:
            if a not in MESH_AXES:
                raise ConfigError(f"{where}.{logical}: '{a}' is not a mesh axis ({', '.join(MESH_AXES)})")
        if len(set(axes)) != len(axes):
            raise ConfigError(f"{where}.{logical}: lists a mesh axis twice ({', '.join(axes)})")
        out[logical] = axes
    return out


def logical_to_spec(axes: tuple[str | None, ...] | None, rules: Rules, where: str = "an array") -> PartitionSpec:
    """The `PartitionSpec` of one array whose dimensions have the logical names `axes` (None: a replicated scalar
    or an unnamed leaf). A dimension's entry is None (replicated), one mesh axis, or a tuple of mesh axes. Refuses
    (`ConfigError` naming `where`) two dimensions of the array on one mesh axis."""
    if axes is None:
        return PartitionSpec()
    entries, owner = [], {}
    for name in axes:
        mesh_axes = rules.get(name, ()) if name is not None else ()
        for a in mesh_axes:
            if a in owner:
                raise ConfigError(f"parallel.rules: logical axes '{owner[a]}' and '{name}' of {where} both map to "
                                  f"mesh axis '{a}', which would split the array twice on it; map one of them to "
                                  "another mesh axis or to null")
            owner[a] = name
        entries.append(None if not mesh_axes else (mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes)))
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def is_axes(x: Any) -> bool:
    """A leaf of a logical-axes tree: a tuple of names (or None, an unnamed leaf)."""
    return x is None or (isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x))


def partition_specs(logical_axes_tree: Any, rules: str | Mapping[str, Any]) -> Any:
    """A tree of `PartitionSpec`s like `logical_axes_tree` (a tree of logical axis-name tuples, e.g.
    `jaxft.models.params.logical_axes(config)` or `jaxft.peft.logical_axes(spec, config, adapter)`), under `rules`
    (a preset name, a user table, or a resolved table)."""
    table = resolve_rules(rules)
    return jax.tree_util.tree_map_with_path(lambda p, a: logical_to_spec(a, table, _dotted(p)), logical_axes_tree,
                                            is_leaf=is_axes)


def _dotted(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def shard_counts(rules: str | Mapping[str, Any], mesh: Any) -> dict[str, int]:
    """Logical axis -> the number of pieces `rules` cut a dimension with that name into on `mesh` (the product of
    its mesh axes' sizes; 1 for a replicated name). NF4 fields use it to keep quantisation blocks inside a shard."""
    return {name: int(math.prod(mesh.shape[a] for a in axes)) for name, axes in resolve_rules(rules).items()}
