"""Shardings of a run's trees, derived from the logical axes and the rules, and their placement on the mesh.

Parameters (`param_shardings`) come from the logical-axes tree; optimizer state follows the parameters it belongs to
(`state_shardings`: a state leaf whose key path ends with a parameter's path and has its shape gets its sharding,
the rest, step counts and the like, is replicated); gradients are computed inside the step and follow the
parameters there; batches are split on their row axis over the data-parallel axes (`batch_sharding`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxft.parallel.rules import BATCH_AXES, is_axes, partition_specs


def param_shardings(logical_axes_tree: Any, rules: str | Mapping[str, Any], mesh: Mesh) -> Any:
    """A tree of `NamedSharding`s like `logical_axes_tree` (see `jaxft.parallel.partition_specs`)."""
    specs = partition_specs(logical_axes_tree, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array every device holds whole."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, row_axis: int = 0) -> NamedSharding:
    """Rows (dimension `row_axis`) split over the data-parallel axes `data` and `fsdp`, the rest replicated. The
    trainer's batches are `[accum, rows, time]`: `row_axis=1`."""
    return NamedSharding(mesh, PartitionSpec(*([None] * row_axis), BATCH_AXES))


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(state: Any, params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state (arrays or `ShapeDtypeStruct`s): a leaf whose dict-key path ends with the
    path of a parameter and has that parameter's shape (Adam's moments, a masked copy) takes the parameter's
    sharding; the rest (counts, scalars) is replicated."""
    table: dict[tuple[str, ...], tuple[tuple[int, ...], Any]] = {}
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, p), s in zip(flat_p, flat_s):
        table[_dict_keys(path)] = (tuple(p.shape), s)
    lengths = sorted({len(k) for k in table}, reverse=True)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for n in lengths:
            hit = table.get(keys[-n:]) if n <= len(keys) else None
            if hit is not None and hit[0] == tuple(getattr(leaf, "shape", ())):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, state)


def place(tree: Any, shardings: Any) -> Any:
    """`tree` on the mesh per `shardings` (a matching tree, or one sharding for all), as NEW buffers: never an alias
    of the caller's arrays, so a step that donates its inputs cannot delete them. (`jax.device_put` of an array that
    already has the target sharding, a replicated leaf on one device for instance, returns the same buffer.)"""
    if isinstance(shardings, NamedSharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), tree, shardings)


def logical_axes_with_shapes(axes_tree: Any, tree: Any) -> list[tuple[str, tuple[str | None, ...], tuple[int, ...]]]:
    """`(dotted path, axes, shape)` of every leaf of `tree` (arrays or ShapeDtypeStructs) with its logical axes."""
    flat_axes = jax.tree.leaves(axes_tree, is_leaf=is_axes)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = []
    for (path, leaf), axes in zip(flat, flat_axes):
        out.append((".".join(_dict_keys(path)), axes, tuple(jnp.shape(leaf))))
    return out
