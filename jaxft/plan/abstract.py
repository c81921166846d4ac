"""A training run as abstract arrays: the trees the trainer's step takes, as `jax.ShapeDtypeStruct`s with their
shardings on the run's mesh, built from the model's `config.json` alone (no weights are read).

    run = abstract_run(cfg, config, devices=jax.devices()[:8])
    lowered = run.step.lower(*run.args)          # the trainer's own step (jaxft.train.step.make_train_step)

The trees are the ones `jaxft.train.build` makes: `trainable` (float32; the whole model for full fine-tuning, the
adapter tree for a PEFT method), `frozen` (the base in `model.param_dtype`; None for full fine-tuning), the
optimizer state (`optimizer.init` traced abstractly), the batches `[grad_accum, batch_size, seq_len]` and the key.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from jaxft import parallel, peft, quant
from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params, logical_axes
from jaxft.parallel.rules import shard_counts
from jaxft.train.config import TrainConfig, check_quantize, method_spec
from jaxft.train.optim import make_optimizer
from jaxft.train.sharded import Placement
from jaxft.train.step import StaticModel, make_train_step

# The optimizer's schedule length does not change any array's shape; a run's real length needs its data.
_PLAN_STEPS = 1000


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """The step, its optimizer and its abstract arguments: `args = (trainable, opt_state, frozen, batches, rng)`, every leaf a
    `ShapeDtypeStruct` carrying its `NamedSharding` on `mesh`."""

    model: StaticModel
    mesh: Mesh
    optimizer: optax.GradientTransformation
    step: Any
    trainable: Any
    opt_state: Any
    frozen: Any
    batches: dict
    rng: Any

    @property
    def args(self) -> tuple:
        return self.trainable, self.opt_state, self.frozen, self.batches, self.rng


def _with(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)), tree)


def _flat(section: parallel.ParallelSection, n_devices: int) -> parallel.ParallelSection:
    """`section` with its multi-slice (`dcn`) factors folded into one flat mesh of the same axis sizes: the fake
    devices of a plan live in one process, and memory per device depends on the axis sizes only."""
    dcn = [getattr(section.dcn, a) for a in parallel.MESH_AXES]
    if dcn == [1, 1, 1] or -1 in dcn:
        return section
    shape = parallel.mesh_shape(section, n_devices, math.prod(dcn))
    return dataclasses.replace(section, mesh=parallel.MeshShape(**shape), dcn=parallel.DcnShape())


def abstract_run(cfg: TrainConfig, config: LlamaConfig, devices: Sequence[jax.Device] | None = None) -> AbstractRun:
    """The trainer's step and abstract arguments for `cfg` on `config`'s model over `devices` (default: all).

    Raises the trainer's one-line `ConfigError`s first: a mesh whose size is not the device count, heads or
    dimensions the mesh does not divide, a global batch the data-parallel size does not divide."""
    spec = method_spec(cfg.method)
    mesh = parallel.make_mesh(_flat(cfg.parallel, len(devices or jax.devices())), devices)
    rules = cfg.parallel.rules
    base = abstract_params(config, jnp.dtype(cfg.model.param_dtype))
    base_axes = logical_axes(config)
    frozen_shardings = None
    if spec is None:
        trainable = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), base)
        trainable_axes, frozen = base_axes, None
        parallel.check_mesh(config, mesh, rules, cfg.train.batch_size)
    else:
        if cfg.quantization() is not None:  # QLoRA: the frozen base in NF4, its fields' axes from the kernels'
            check_quantize(cfg.quantization(), config)
            base = quant.abstract_quantized(base, quant.QuantPlan.from_section(cfg.quantize))
            base_axes = quant.tree_axes(base_axes, base, shard_counts(rules, mesh))
        trainable = jax.eval_shape(lambda p, k: peft.init(spec, config, p, k), base, jax.random.key(0))
        trainable_axes = peft.logical_axes(spec, config, trainable)
        parallel.check_mesh(config, mesh, rules, cfg.train.batch_size, adapter=(trainable_axes, trainable))
        frozen_shardings = parallel.param_shardings(base_axes, rules, mesh)
        frozen = _with(base, frozen_shardings)
    trainable_shardings = parallel.param_shardings(trainable_axes, rules, mesh)
    optimizer = make_optimizer(cfg.optim, trainable, _PLAN_STEPS)
    if spec is not None:
        optimizer = optax.chain(optimizer, peft.mask_updates(peft.trainable_mask(spec, base, trainable)))
    opt_state = jax.eval_shape(optimizer.init, trainable)
    opt_shardings = parallel.state_shardings(opt_state, trainable, trainable_shardings, mesh)
    opt_state = _with(opt_state, opt_shardings)
    trainable = _with(trainable, trainable_shardings)
    shape = (cfg.train.grad_accum, cfg.train.batch_size, cfg.data.seq_len)
    rows = parallel.batch_sharding(mesh, row_axis=1)
    batches = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)
               for k in ("input_ids", "segment_ids", "positions")}
    batches["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.bool_, sharding=rows)
    rng = _replicated(jax.eval_shape(lambda: jax.random.key(0)), mesh)
    options = cfg.model.options()  # compute_dtype auto: this host's platform (`train --plan` passes the run's)
    model = StaticModel(config, spec, options)
    # the trainer's own step: on a mesh of several devices it is placed (gradient and head sharding constraints)
    where = None if mesh.size == 1 else Placement(mesh, trainable_shardings, frozen_shardings, opt_shardings, rows,
                                                  parallel.replicated(mesh))
    return AbstractRun(model, mesh, optimizer, make_train_step(model, optimizer, where), trainable, opt_state, frozen,
                       batches, rng)


def shard_bytes(tree: Any) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings, or arrays): per leaf, the shape of one
    shard (`sharding.shard_shape`) times the item size. A leaf without a sharding counts whole."""
    total = 0
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        shape = sharding.shard_shape(x.shape) if isinstance(sharding, NamedSharding) else x.shape
        n = 1
        for d in shape:
            n *= d
        total += n * jnp.dtype(x.dtype).itemsize
    return total
