"""The start-up check of a mesh against a model, rules and batch: every refusal a one-line `ConfigError` naming the
axis and the numbers, raised before any weight is read.

Heads are checked on head counts, not array dimensions: `q_proj.kernel` is `[D, H * hd]`, so an array check passes
for SmolLM2's 9 heads over tensor=2 (9 * 64 = 576 is even) while the split would cut a head in half.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from jaxft.errors import ConfigError
from jaxft.models.config import LlamaConfig
from jaxft.models.params import logical_axes, abstract_params
from jaxft.parallel.rules import BATCH_AXES, resolve_rules
from jaxft.parallel.sharding import logical_axes_with_shapes


def _size(mesh_shape: Mapping[str, int], axes: Sequence[str]) -> int:
    return math.prod(mesh_shape.get(a, 1) for a in axes)


def data_parallel_size(mesh: Any) -> int:
    """Devices the batch rows are split over: the product of the mesh's `data` and `fsdp` sizes."""
    return _size(dict(mesh.shape), BATCH_AXES)


def check_batch(mesh: Any, batch_size: int, where: str = "train.batch_size") -> None:
    """Refuse a global batch that does not split evenly over the data-parallel devices."""
    shape = dict(mesh.shape)
    n = data_parallel_size(mesh)
    if batch_size % n:
        raise ConfigError(f"{where}: {batch_size} rows do not split over the {n} data-parallel devices "
                          f"(data={shape.get('data', 1)} x fsdp={shape.get('fsdp', 1)}); batch_size is the global "
                          f"batch: use a multiple of {n}, or change parallel.mesh")


def check_heads(config: LlamaConfig, mesh: Any, rules: str | Mapping[str, Any]) -> None:
    """Refuse rules that split attention heads or KV heads off their boundaries."""
    table, shape = resolve_rules(rules), dict(mesh.shape)
    for logical, count, what in (("q_heads", config.num_attention_heads, "attention heads"),
                                 ("kv_heads", config.num_key_value_heads, "key/value heads")):
        axes = table.get(logical, ())
        n = _size(shape, axes)
        if n > 1 and count % n:
            names = " x ".join(f"{a}={shape[a]}" for a in axes)
            raise ConfigError(f"parallel.rules: {logical} on mesh axis {names} would split the model's {count} "
                              f"{what} off their boundaries ({count} is not a multiple of {n}); use a {axes[-1]} "
                              f"size that divides {count}, or map {logical} to null")


def check_dims(mesh: Any, rules: str | Mapping[str, Any], leaves: list[tuple[str, tuple, tuple[int, ...]]],
               what: str = "parameter") -> None:
    """Refuse a dimension that its mesh axes do not divide. `leaves`: `(path, logical axes, shape)` triples
    (`jaxft.parallel.sharding.logical_axes_with_shapes`)."""
    table, shape = resolve_rules(rules), dict(mesh.shape)
    for path, axes, dims in leaves:
        if axes is None:
            continue
        for name, dim in zip(axes, dims):
            mesh_axes = table.get(name, ()) if name is not None else ()
            n = _size(shape, mesh_axes)
            if n > 1 and dim % n:
                names = " x ".join(f"{a}={shape[a]}" for a in mesh_axes)
                raise ConfigError(f"parallel.rules: {what} {path} has {name}={dim}, which mesh axis {names} does "
                                  f"not divide ({dim} is not a multiple of {n}); map {name} to another axis or to "
                                  "null, or change parallel.mesh")


def check_mesh(config: LlamaConfig, mesh: Any, rules: str | Mapping[str, Any], batch_size: int | None = None,
               adapter: tuple[Any, Any] | None = None) -> None:
    """The start-up check: heads on head boundaries, every base parameter's (and with `adapter = (logical axes
    tree, tree of arrays or ShapeDtypeStructs)`, every adapter leaf's) dimensions divisible by their mesh axes,
    and `batch_size` (the global batch) divisible by the data-parallel size. `mesh` is a `Mesh` or an
    `AbstractMesh` (only its axis sizes are read). A mesh whose size differs from the device count is refused
    earlier, by `make_mesh`."""
    resolve_rules(rules)
    check_heads(config, mesh, rules)
    check_dims(mesh, rules, logical_axes_with_shapes(logical_axes(config), abstract_params(config)))
    if adapter is not None:
        check_dims(mesh, rules, logical_axes_with_shapes(*adapter), "adapter leaf")
    if batch_size is not None:
        check_batch(mesh, batch_size)
