"""The trainer on a device mesh: the mesh of a run, its start-up check, and where each tree of a session lives.

A run on one device (the default on a machine with one) has no mesh: nothing is placed or constrained and the step
is the single-device program. With more devices, `run_mesh` builds the mesh of `cfg.parallel`, `check_run` refuses
what cannot split (before any weight is read), and `Placement` holds the shardings: the trainable tree's from its
logical axes (the base's from `jaxft.models.params`, an adapter's from its PEFT method), the frozen base's, the
optimizer state's (following the trainable leaves), and the batches' (`[accum, rows, time]`, rows over data x fsdp).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding

from jaxft import parallel, peft
from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params, logical_axes
from jaxft.parallel import distributed
from jaxft.parallel.config import ParallelSection


def run_mesh(section: ParallelSection, devices=None) -> Mesh | None:
    """The run's mesh over `devices` (default: all), or None when it is one device (the single-device program)."""
    devices = list(jax.devices() if devices is None else devices)
    mesh = parallel.make_mesh(section, devices)
    return None if mesh.size == 1 else mesh


def trainable_axes(config: LlamaConfig, spec: Any, trainable: Any) -> Any:
    """Logical axes of the trainable tree: the model's (full fine-tuning, `spec` None) or the adapter's."""
    return logical_axes(config) if spec is None else peft.logical_axes(spec, config, trainable)


def check_run(config: LlamaConfig, spec: Any, section: ParallelSection, mesh: Any, batch_size: int) -> None:
    """The start-up check of a run on `mesh` (a Mesh or AbstractMesh): heads, every base and adapter dimension, and
    the global batch (`jaxft.parallel.check_mesh`); runs on shapes only."""
    adapter = None
    if spec is not None:
        shapes = jax.eval_shape(lambda p: peft.init(spec, config, p, jax.random.key(0)), abstract_params(config))
        adapter = (peft.logical_axes(spec, config, shapes), shapes)
    parallel.check_mesh(config, mesh, section.rules, batch_size, adapter=adapter)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a session's trees live: `trainable`, `frozen` (None for full fine-tuning) and `opt_state` are trees
    of NamedShardings like those trees; `batch` is the sharding of a `[accum, rows, time]` batch array;
    `replicated` that of the PRNG key and the metrics."""

    mesh: Mesh
    trainable: Any
    frozen: Any
    opt_state: Any
    batch: NamedSharding
    replicated: NamedSharding


def placement(mesh: Mesh, rules: Any, config: LlamaConfig, spec: Any, trainable: Any, frozen: Any,
              opt_state: Any) -> Placement:
    """The shardings of a session's trees on `mesh` under `rules` (a preset or table)."""
    t_shard = parallel.param_shardings(trainable_axes(config, spec, trainable), rules, mesh)
    f_shard = None if frozen is None else parallel.param_shardings(logical_axes(config), rules, mesh)
    o_shard = parallel.state_shardings(opt_state, trainable, t_shard, mesh)
    return Placement(mesh, t_shard, f_shard, o_shard, parallel.batch_sharding(mesh, row_axis=1),
                     parallel.replicated(mesh))


def _place(tree: Any, shardings: Any) -> Any:
    """`tree` on `shardings` as fresh buffers. A leaf that is already a global array (it spans processes, e.g.
    read slab by slab or computed from such arrays) is re-placed by `jax.device_put`; any other leaf (host data,
    an array on one local device, the same on every process: an adapter's init, optax's step count) is built
    shard by shard from its host value, which works under several processes where `device_put` does not."""
    def one(x, s):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jax.device_put(x, s, may_alias=False)
        if jax.process_count() > 1:
            return distributed.put_global(x, s)
        return jax.device_put(x, s, may_alias=False)

    return jax.tree.map(one, tree, shardings)


def place_session_trees(p: Placement, trainable: Any, frozen: Any, opt_state: Any) -> tuple[Any, Any, Any]:
    """`(trainable, frozen, opt_state)` on the mesh. The trees a step donates (trainable, optimizer state) are
    fresh buffers, never aliases of the caller's arrays; the frozen base is not donated and may share them (it is
    left as it is when it already has its shardings: loaded slab by slab)."""
    trainable = _place(trainable, p.trainable)
    opt_state = _place(opt_state, p.opt_state)
    if frozen is not None and any(x.sharding != s for x, s in zip(jax.tree.leaves(frozen),
                                                                  jax.tree.leaves(p.frozen))):
        frozen = jax.device_put(frozen, p.frozen)
    return trainable, frozen, opt_state


def put_replicated(key: jax.Array, p: Placement) -> jax.Array:
    """A PRNG key made the same on every process, as one array replicated over the mesh."""
    data = jax.random.key_data(key)
    return jax.random.wrap_key_data(_place(data, p.replicated), impl=jax.random.key_impl(key))
