"""The `parallel` section of a run config: the device mesh, the sharding rules, and multi-host start-up.

    parallel:
      mesh: {data: 1, fsdp: -1, tensor: 1}   # devices per axis within a slice / host; -1 fills the rest
      dcn: {data: 1, fsdp: 1, tensor: 1}     # slices / hosts per axis (multi-slice TPU, multi-node GPU)
      rules: fsdp                            # a preset (fsdp, tensor, data, fsdp+tensor) or a table
      distributed: {coordinator: null, num_processes: null, process_id: null, timeout_s: 300}

The defaults give one device today's single-device run exactly (a mesh of one device is no mesh at all: nothing is
placed or constrained), and 8 devices an 8-way FSDP run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxft.errors import ConfigError
from jaxft.parallel.rules import MESH_AXES, resolve_rules


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Devices per mesh axis within one slice (one host of a multi-node GPU run): data: pure data parallelism
    (parameters replicated). fsdp: data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3).
    tensor: tensor (Megatron) parallelism over heads, MLP columns and the vocabulary. One axis may be -1: it takes
    the devices the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def __post_init__(self):
        _check_sizes(self, "parallel.mesh", allow_fill=True)


@dataclasses.dataclass(frozen=True)
class DcnShape:
    """Slices (TPU multi-slice) or hosts (multi-node GPU) per mesh axis, joined by the data-centre network: data /
    fsdp / tensor: the factor of that axis that crosses slices (the axis's full size is mesh x dcn). Keep tensor at
    1: its collectives are too frequent for the slower network. One axis may be -1: it takes the slices the others
    leave."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        _check_sizes(self, "parallel.dcn", allow_fill=True)


def _check_sizes(shape: Any, where: str, allow_fill: bool) -> None:
    fills = [a for a in MESH_AXES if getattr(shape, a) == -1]
    for a in MESH_AXES:
        v = getattr(shape, a)
        if v == 0 or v < -1:
            raise ConfigError(f"{where}.{a}: must be a positive number of devices (or -1: the rest), got {v}")
    if len(fills) > 1 or (fills and not allow_fill):
        raise ConfigError(f"{where}: only one axis may be -1 (fill the rest), got {', '.join(fills)}")


@dataclasses.dataclass(frozen=True)
class DistributedSection:
    """Multi-host start-up (`jax.distributed.initialize`), read by `jaxft.parallel.distributed`. Leave all null on
    one host, and on Cloud TPU, GKE, SLURM and Open MPI, where jax finds them itself; elsewhere set them here or
    through JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. coordinator: `host:port` of process 0.
    num_processes: how many processes take part. process_id: this process's index (0 .. num_processes - 1).
    timeout_s: how long a process waits for the coordinator before it gives up with an error naming it."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    timeout_s: int = 300

    def __post_init__(self):
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"parallel.distributed.num_processes: must be >= 1, got {self.num_processes}")
        if self.process_id is not None and (self.process_id < 0 or (
                self.num_processes is not None and self.process_id >= self.num_processes)):
            raise ConfigError(f"parallel.distributed.process_id: must be in 0..num_processes-1, got "
                              f"{self.process_id} with num_processes={self.num_processes}")
        if self.timeout_s < 1:
            raise ConfigError(f"parallel.distributed.timeout_s: must be >= 1 second, got {self.timeout_s}")


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    """mesh: devices per axis (data, fsdp, tensor) within a slice; -1 fills the rest. dcn: the multi-slice /
    multi-node factor of each axis. rules: how parameters map onto the mesh: a preset, `fsdp` (parameters sharded
    over fsdp on their model dimension), `tensor` (heads, MLP columns and vocabulary over tensor), `data` (replicated),
    `fsdp+tensor` (both), or a table `{logical axis: mesh axis, list of mesh axes, or null}` (logical axes: vocab,
    embed, q_heads, kv_heads, head_dim, mlp, layers, norm, lora_rank, bottleneck, virtual_tokens; unnamed ones are
    replicated). Batches are always split over data and fsdp. distributed: multi-host start-up."""

    mesh: MeshShape = MeshShape()
    dcn: DcnShape = DcnShape()
    rules: str | Mapping[str, Any] = "fsdp"
    distributed: DistributedSection = DistributedSection()

    def __post_init__(self):
        resolve_rules(self.rules)  # refuse an unknown preset, axis or a doubly used mesh axis at parse time
