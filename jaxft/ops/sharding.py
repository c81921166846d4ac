"""Sharding constraints at the points GSPMD cannot guess, as no-ops when no mesh is set.

Under `jax.set_mesh(mesh)` (the trainer sets it while it traces a step) `batch_rows(x)` pins `x`'s leading dimension
to the data-parallel mesh axes (`data`, `fsdp`); without a mesh, or when no data-parallel axis has more than one
device, it returns `x` unchanged, so single-device programs are exactly what they were. Why they are needed: a
batch placed on (data, fsdp) meets FSDP weights sharded on the same fsdp axis in the embedding gather and the first
matmul, and GSPMD then often keeps the weight's sharding and all-gathers the activations, so every device computes
the whole batch. One constraint on the embedding output, one on the layer scan's carry and one on each loss chunk
keep the rows split.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

# The mesh axes a batch's rows are split over (jaxft.parallel names the same axes).
DATA_AXES = ("data", "fsdp")


def data_axes() -> tuple[str, ...]:
    """The data-parallel axes of the current mesh with more than one device (empty without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    shape = dict(mesh.shape)
    return tuple(a for a in DATA_AXES if shape.get(a, 1) > 1)


def batch_rows(x: jax.Array, rest_free: bool = False) -> jax.Array:
    """`x` with its leading dimension split over the data-parallel mesh axes. The other dimensions are replicated,
    or left to GSPMD with `rest_free` (e.g. a vocabulary dimension that tensor parallelism splits). A no-op without
    a mesh, and when the rows do not divide evenly (an odd-sized eval batch)."""
    axes = data_axes()
    if not axes:
        return x
    size = 1
    shape = dict(jax.sharding.get_abstract_mesh().shape)
    for a in axes:
        size *= shape[a]
    if x.ndim == 0 or x.shape[0] % size:
        return x
    rest = (PartitionSpec.UNCONSTRAINED,) * (x.ndim - 1) if rest_free else ()
    return jax.lax.with_sharding_constraint(x, PartitionSpec(axes if len(axes) > 1 else axes[0], *rest))
