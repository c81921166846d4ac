"""Scale-out: the device mesh, logical-axis sharding rules, and the shardings of a run's trees.

    from jaxft import parallel
    mesh = parallel.make_mesh(cfg.parallel)                      # Mesh('data', 'fsdp', 'tensor'), AxisType.Auto
    parallel.check_mesh(config, mesh, cfg.parallel.rules, cfg.train.batch_size)   # one-line ConfigErrors
    specs = parallel.partition_specs(jaxft.models.params.logical_axes(config), "fsdp")   # tree of PartitionSpec
    shard = parallel.param_shardings(axes_tree, rules, mesh)     # tree of NamedSharding
    params = parallel.place(params, shard)                       # fresh buffers on the mesh

The public names:

- `ParallelSection`, `MeshShape`, `DcnShape`, `DistributedSection`: the config's `parallel` section.
- `make_mesh(section=None, devices=None) -> Mesh`; `mesh_shape(section, n_devices, n_slices=1) -> {axis: size}`.
- `PRESETS`, `LOGICAL_AXES`, `resolve_rules(rules) -> {logical: (mesh axes)}`: presets `fsdp`, `tensor`, `data`,
  `fsdp+tensor`, or a table; two logical axes on one mesh axis are refused.
- `logical_to_spec(axes, rules) -> PartitionSpec` (one array); `partition_specs(axes_tree, rules)` (a tree).
- `param_shardings(axes_tree, rules, mesh)`, `state_shardings(state, params, shardings, mesh)` (optimizer state
  follows its parameters), `batch_sharding(mesh, row_axis=0)`, `replicated(mesh)`.
- `place(tree, shardings)`: `device_put` that never aliases the caller's buffers (a donating step cannot free
  them).
- `check_mesh(config, mesh, rules, batch_size=None, adapter=None)`, `data_parallel_size(mesh)`: the start-up check.

Meshes carry three axes always (a size-1 axis costs nothing): `data` (replicated parameters), `fsdp` (parameters,
gradients and optimizer state sharded; rows split too), `tensor` (heads, MLP columns, vocabulary). `train.batch_size`
is the global batch: rows per step over all devices, split over `data` x `fsdp`.
"""

from jaxft.parallel.checks import check_batch, check_dims, check_heads, check_mesh, data_parallel_size
from jaxft.parallel.config import DcnShape, DistributedSection, MeshShape, ParallelSection
from jaxft.parallel.mesh import make_mesh, mesh_shape
from jaxft.parallel.rules import BATCH_AXES, LOGICAL_AXES, MESH_AXES, PRESETS, logical_to_spec, partition_specs, resolve_rules
from jaxft.parallel.sharding import (batch_sharding, logical_axes_with_shapes, param_shardings, place, replicated,
                                     state_shardings)

__all__ = ["BATCH_AXES", "LOGICAL_AXES", "MESH_AXES", "PRESETS", "DcnShape", "DistributedSection", "MeshShape",
           "ParallelSection", "batch_sharding", "check_batch", "check_dims", "check_heads", "check_mesh",
           "data_parallel_size", "logical_axes_with_shapes", "logical_to_spec", "make_mesh", "mesh_shape",
           "param_shardings", "partition_specs", "place", "replicated", "resolve_rules", "state_shardings"]
