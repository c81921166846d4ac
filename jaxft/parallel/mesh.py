"""The device mesh of a run: axes `data`, `fsdp`, `tensor`, all of type `AxisType.Auto`.

Auto, not jax's Explicit default (jax 0.10-0.12 `jax.make_mesh`): under Explicit axes the sharding is part of every
array's type and the embedding's `jnp.take` has no rule for it; under Auto, GSPMD propagates shardings from the
inputs and from `with_sharding_constraint`. A multi-slice / multi-node mesh (`dcn` above 1) is laid out by
`mesh_utils.create_hybrid_device_mesh` (the fast ICI axes inside a slice, the dcn factor across slices), which
`jax.make_mesh` does not do.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from jaxft.errors import ConfigError
from jaxft.parallel.config import DcnShape, ParallelSection
from jaxft.parallel.rules import MESH_AXES


def _fill(shape: dict[str, int], total: int, where: str, what: str) -> dict[str, int]:
    """`shape` with its -1 axis set so that the product is `total`; refuses a product that cannot be `total`."""
    fixed = math.prod(v for v in shape.values() if v != -1)
    sizes = ", ".join(f"{a}={v}" for a, v in shape.items())
    if -1 in shape.values():
        if total % fixed:
            raise ConfigError(f"{where}: {sizes} leaves no whole number for the -1 axis over {total} {what} "
                              f"({total} is not a multiple of {fixed})")
        return {a: (total // fixed if v == -1 else v) for a, v in shape.items()}
    if fixed != total:
        raise ConfigError(f"{where}: {sizes} has {fixed} {what}, but there are {total}; make the product "
                          f"{total} or set one axis to -1")
    return dict(shape)


def mesh_shape(section: ParallelSection, n_devices: int, n_slices: int = 1) -> dict[str, int]:
    """`{axis: size}` of the whole mesh (ICI x DCN) for `n_devices` devices in `n_slices` slices, the -1 axes
    filled. Raises `ConfigError` when the sizes do not multiply to the device count."""
    if n_devices % n_slices:
        raise ConfigError(f"parallel.dcn: {n_devices} devices do not split into {n_slices} equal slices")
    dcn = _fill({a: getattr(section.dcn, a) for a in MESH_AXES}, n_slices, "parallel.dcn", "slices")
    ici = _fill({a: getattr(section.mesh, a) for a in MESH_AXES}, n_devices // n_slices, "parallel.mesh",
                "devices" + (" per slice" if n_slices > 1 else ""))
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _n_slices(devices: Sequence, dcn: DcnShape) -> int:
    """Slices: the product of `dcn` when it is fixed, else the distinct `slice_index` (TPU) or process (GPU/CPU)."""
    sizes = [getattr(dcn, a) for a in MESH_AXES]
    if -1 not in sizes:
        return math.prod(sizes)
    kinds = {getattr(d, "slice_index", None) for d in devices}
    if None in kinds:
        kinds = {d.process_index for d in devices}
    return len(kinds)


def make_mesh(section: ParallelSection | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The run's `Mesh` over `devices` (default: all of `jax.devices()`), axes `('data', 'fsdp', 'tensor')`, Auto.

    Raises `ConfigError` when the configured sizes do not multiply to the device count."""
    section = section or ParallelSection()
    devices = list(jax.devices() if devices is None else devices)
    n_slices = _n_slices(devices, section.dcn)
    shape = mesh_shape(section, len(devices), n_slices)
    if n_slices > 1:
        dcn = _fill({a: getattr(section.dcn, a) for a in MESH_AXES}, n_slices, "parallel.dcn", "slices")
        ici = [shape[a] // dcn[a] for a in MESH_AXES]
        grid = mesh_utils.create_hybrid_device_mesh(ici, [dcn[a] for a in MESH_AXES], devices,
                                                    process_is_granule=not hasattr(devices[0], "slice_index"))
    else:
        try:
            grid = mesh_utils.create_device_mesh([shape[a] for a in MESH_AXES], devices)
        except (ValueError, NotImplementedError, AssertionError):
            # physical-topology layouts refuse some shapes (TPU torus splits); device order is then as listed
            grid = np.asarray(devices).reshape([shape[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
