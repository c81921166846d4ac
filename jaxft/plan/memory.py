"""Per-device memory of a training step, from the compiled step (XLA's buffer assignment) and by rule of thumb.

`plan_memory(cfg, config, devices, device_memory)` compiles the trainer's step ahead of time on abstract arrays
(`jaxft.plan.abstract`) and splits the compiled per-device total into

    params       the frozen base (model.param_dtype) + the trainable tree (float32), this device's shards
    optimizer    the optimizer state (AdamW: m and v, float32, sharded like their parameters)
    gradients    one float32 gradient per trainable value (the accumulation buffer), sharded like the trainable tree
    activations  the rest of the compiled total: saved activations, the step's temporaries, the batch
    total        arguments + outputs - donated aliases + temporaries (`Compiled.memory_analysis()`)

params, optimizer and gradients are sums over the abstract trees' leaves and shardings (exact); total is XLA's.

On XLA:CPU (this planner fakes devices as CPU devices) the step is compiled with while-loop-invariant code motion
off: XLA:CPU has no bfloat16 matmul, converts bfloat16 weights to float32, and that pass hoists the conversion of
a whole stacked weight out of the layer loop, a float32 copy of the model no GPU or TPU makes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxft.errors import ConfigError
from jaxft.models.config import LlamaConfig
from jaxft.plan.abstract import AbstractRun, abstract_run, shard_bytes
from jaxft.train.config import TrainConfig
from jaxft.train.step import count_params

GiB = 1 << 30
_CPU_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion,while-loop-expensive-invariant-code-motion"}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """The rule of thumb: `bytes` per device by `formula` (states, plus saved layer inputs under full remat)."""

    bytes: int
    formula: str


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one training step (see the module docstring), the device's memory, the rule-of-thumb
    estimate, the mesh, the parameter counts and XLA's raw figures (`compiled`)."""

    params: int
    optimizer: int
    gradients: int
    activations: int
    total: int
    device_memory: int
    estimate: Estimate
    mesh: dict[str, int]
    n_params: int
    n_trainable: int
    compiled: dict[str, int]
    compile_s: float

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    def per_device(self) -> dict[str, int]:
        return {"params": self.params, "optimizer": self.optimizer, "gradients": self.gradients,
                "activations": self.activations, "total": self.total}


def parse_bytes(text: str | int, where: str = "--device-memory") -> int:
    """`80GiB`, `80GB`, `16G`, `512MiB` or a number of bytes -> bytes (G/GiB = 2**30, GB = 10**9)."""
    if isinstance(text, int):
        return text
    s = str(text).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10**3, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
             "g": GiB, "gib": GiB, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].lower()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise ConfigError(f"{where}: cannot read '{text}' as a memory size; write e.g. 80GiB, 16G or 40GB")
    return int(value * units[unit])


def default_device_memory(device: jax.Device, n_devices: int) -> int:
    """The memory of `device`: XLA's limit on GPU/TPU (`memory_stats()['bytes_limit']`); on CPU the host's memory
    shared by the fake devices."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices raise or return None depending on the jax version
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    with open("/proc/meminfo") as f:
        total_kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return total_kib * 1024 // max(1, n_devices)


def rule_of_thumb(cfg: TrainConfig, config: LlamaConfig, mesh: dict[str, int], n_params: int,
                  n_trainable: int) -> Estimate:
    """Weights, gradients and AdamW state by the usual bytes-per-parameter counts, split over the devices that
    shard parameters (all but the `data` axis; `rules: data` replicates them), plus under full remat the saved
    input of each layer (L x rows per device x T x D x compute bytes); the other activations are left out."""
    shards = 1 if cfg.parallel.rules == "data" else math.prod(mesh.values()) // mesh.get("data", 1)
    c = jnp.dtype(cfg.model.resolved_compute_dtype()).itemsize
    rows = max(1, cfg.train.batch_size // (mesh.get("data", 1) * mesh.get("fsdp", 1)))
    saved = (config.num_hidden_layers * rows * cfg.data.seq_len * config.hidden_size * c
             if cfg.model.remat == "full" else 0)
    if cfg.method_type == "full":
        states = 16 * n_params // shards
        formula = "16 B/param (fp32 weights 4 + fp32 gradients 4 + AdamW m, v 8)"
    elif cfg.quantized:  # NF4: 4 bits + an 8-bit absmax per 64 + an fp32 per 64*256 (double quantisation)
        states = int(0.5165 * n_params + 16 * n_trainable) // shards
        formula = "0.52 B/param NF4 base (4-bit codes + double-quantised absmax) + 16 B/trainable param"
    else:
        p = jnp.dtype(cfg.model.param_dtype).itemsize
        states = (p * n_params + 16 * n_trainable) // shards
        formula = f"{p} B/param frozen base ({cfg.model.param_dtype}) + 16 B/trainable param (fp32 adapter, gradient, AdamW m, v)"
    formula += f", over {shards} device{'s' if shards > 1 else ''}"
    if saved:
        formula += " + saved layer inputs L*rows*T*D*" + str(c) + " B (full remat)"
    else:
        formula += "; activations not counted (remat != full)"
    return Estimate(int(states + saved), formula)


def compile_step(run: AbstractRun, progress: Callable[[str], None] = lambda s: None):
    """`(compiled, seconds)`: the step lowered on the abstract arguments under the run's mesh and compiled for its
    devices."""
    t = time.perf_counter()
    with jax.set_mesh(run.mesh):  # as the trainer traces its step: the model's sharding constraints see the mesh
        lowered = run.step.lower(*run.args)
    progress(f"lowered the train step ({time.perf_counter() - t:.1f} s); compiling for "
             f"{run.mesh.size} device{'s' if run.mesh.size > 1 else ''} ({run.mesh.devices.flat[0].platform})")
    options = _CPU_OPTIONS if run.mesh.devices.flat[0].platform == "cpu" else {}
    compiled = lowered.compile(compiler_options=options)
    return compiled, time.perf_counter() - t


def plan_memory(cfg: TrainConfig, config: LlamaConfig, devices: Sequence[jax.Device] | None = None,
                device_memory: int | None = None, progress: Callable[[str], None] = lambda s: None) -> MemoryPlan:
    """Compile `cfg`'s training step for `devices` (default: all) on abstract arrays and return the per-device
    memory plan. No weights are read; the one-line `ConfigError`s of the mesh checks come before any compile."""
    devices = list(jax.devices() if devices is None else devices)
    progress("building the abstract trees from config.json (no weights read)")
    run = abstract_run(cfg, config, devices)
    compiled, seconds = compile_step(run, progress)
    m = compiled.memory_analysis()
    raw = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    total = raw["argument"] + raw["output"] - raw["alias"] + raw["temp"]
    params = shard_bytes(run.trainable) + shard_bytes(run.frozen)
    optimizer = shard_bytes(run.opt_state)
    gradients = shard_bytes(run.trainable)  # float32 like the trainable tree, sharded like it
    mesh = {str(k): int(v) for k, v in run.mesh.shape.items()}
    n_params = count_params(run.trainable if run.frozen is None else run.frozen)
    n_trainable = count_params(run.trainable)
    memory = device_memory if device_memory is not None else default_device_memory(devices[0], len(devices))
    return MemoryPlan(params, optimizer, gradients, max(0, total - params - optimizer - gradients), total, memory,
                      rule_of_thumb(cfg, config, mesh, n_params, n_trainable), mesh, n_params, n_trainable, raw,
                      seconds)
