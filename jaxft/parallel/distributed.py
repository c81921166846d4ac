"""Multi-host runs: `jax.distributed` start-up, process-0 duties, and moving data between host memory and arrays
that span processes.

JAX's multi-controller runtime is the engine: every process runs the same program over its own devices, `jit`
partitions each step over the global mesh, and the processes meet in collectives. What a run needs around it:

- `initialize(section)`: connect to the coordinator from `parallel.distributed` (coordinator, num_processes,
  process_id, timeout_s), else from `JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` (jax itself
  reads only the first), else let `jax.distributed` detect Cloud TPU, GKE, SLURM or Open MPI. Without any of these a
  run is single-process and nothing happens. jax's own time-out aborts the process with a C++ stack trace
  (`client.h: Terminating process ... DEADLINE_EXCEEDED`); here the connection runs in a helper thread, and when it
  has not completed after `timeout_s` the caller gets one `JaxftError` line naming the coordinator.
- `is_primary()`: process 0 writes the files meant once per run (metrics, plots, summaries, exports).
- `agree(flag)`: True on every process when it is True on any (a stop request must stop all of them at one step,
  or the others wait forever in the next collective).
- `put_global`, `array_from_blocks`, `host_array`, `process_rows`, `global_batch`: host data in, host data out, per
  process.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxft.errors import ConfigError, JaxftError

__all__ = ["DistributedSettings", "agree", "array_from_blocks", "gather_ints", "global_batch", "host_array", "initialize", "is_primary",
           "put_global", "process_rows", "settings", "sync"]

DEFAULT_TIMEOUT_S = 300  # jax.distributed's own default (initialization_timeout)
ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_state = {"initialized": False}


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """Where this process meets the others. `coordinator` None with `auto` True: jax.distributed detects the
    cluster (Cloud TPU, GKE, SLURM, Open MPI) itself. `source` says where the values came from, for messages."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: float
    source: str
    auto: bool = False


def _field(section: Any, name: str) -> Any:
    if section is None:
        return None
    if isinstance(section, Mapping):
        return section.get(name)
    return getattr(section, name, None)


def _int(value: Any, where: str, low: int) -> int:
    try:
        out = int(value)
        if out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a whole number; set it to an integer >= {low}") from None
    if out < low:
        raise ConfigError(f"{where}: {out} must be >= {low}")
    return out


def _cluster_detected(environ: Mapping[str, str]) -> str | None:
    """The cluster jax.distributed would detect by itself with more than one process, by its environment
    variables (jax's `ClusterEnv.is_env_present` rules; Cloud TPU VMs also answer a metadata query we skip)."""
    if all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                  "SLURM_LOCALID")) and int(environ["SLURM_NTASKS"] or 1) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "2") or 2) > 1:
        return "Open MPI"
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "Cloud TPU / GKE"
    return None


def settings(section: Any = None, environ: Mapping[str, str] | None = None,
             where: str = "parallel.distributed") -> DistributedSettings | None:
    """The settings of this process, None for a single-process run. `section` is the config's
    `parallel.distributed` (a mapping or an object with `coordinator`, `num_processes`, `process_id`,
    `timeout_s`); a field it leaves unset comes from the JAX_* environment variables. Raises `ConfigError` (one
    line, naming the field or variable) for a malformed value, before anything connects."""
    environ = os.environ if environ is None else environ
    timeout = _field(section, "timeout_s")
    timeout_s = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    if timeout_s <= 0:
        raise ConfigError(f"{where}.timeout_s: {timeout} must be > 0 seconds (jax's default is {DEFAULT_TIMEOUT_S})")
    values, sources = {}, []
    for name, var in zip(("coordinator", "num_processes", "process_id"), ENV):
        v = _field(section, name)
        if v is not None:
            values[name] = v
            sources.append(f"{where}.{name}")
        elif environ.get(var):
            values[name] = environ[var]
            sources.append(var)
    if not values:
        cluster = _cluster_detected(environ)
        return None if cluster is None else DistributedSettings(None, None, None, timeout_s, cluster, auto=True)
    source = ", ".join(sources)
    missing = [f"{where}.{n} (or {v})" for n, v in zip(("coordinator", "num_processes", "process_id"), ENV)
               if n not in values]
    if missing:
        raise ConfigError(f"{source} given but not {', '.join(missing)}: a multi-host run needs all three "
                          "(the same coordinator and num_processes on every process, process_id 0..n-1)")
    coordinator = str(values["coordinator"])
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{where}.coordinator / JAX_COORDINATOR_ADDRESS: {coordinator!r} is not host:port "
                          "(e.g. 10.0.0.1:1234, the address of process 0 and a free port there)")
    n = _int(values["num_processes"], f"{where}.num_processes / JAX_NUM_PROCESSES", 1)
    pid = _int(values["process_id"], f"{where}.process_id / JAX_PROCESS_ID", 0)
    if pid >= n:
        raise ConfigError(f"{where}.process_id / JAX_PROCESS_ID: {pid} is not below num_processes={n}; number "
                          "the processes 0..n-1")
    if n == 1:
        return None
    return DistributedSettings(coordinator, n, pid, timeout_s, source)


def initialize(section: Any = None, environ: Mapping[str, str] | None = None,
               where: str = "parallel.distributed") -> DistributedSettings | None:
    """Connect this process to the others (see `settings`); returns the settings used, None when the run is
    single-process (nothing is done then). Call it before anything touches a jax device. A second call after a
    successful one returns at once.

    When the connection has not completed after `timeout_s` (a coordinator that is not up or not reachable, a
    process that never started), raises `JaxftError` naming the coordinator, this process and what to check.
    jax's own time-out is set 60 s later, so it never fires first."""
    s = settings(section, environ, where)
    if s is None or _state["initialized"]:
        return s
    kwargs: dict[str, Any] = {"initialization_timeout": int(s.timeout_s) + 60}
    if not s.auto:
        kwargs.update(coordinator_address=s.coordinator, num_processes=s.num_processes, process_id=s.process_id)
    failure: list[BaseException] = []

    def connect():
        try:
            jax.distributed.initialize(**kwargs)
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    worker = threading.Thread(target=connect, name="jaxft-distributed-init", daemon=True)
    worker.start()
    worker.join(s.timeout_s)
    who = (f"process {s.process_id} of {s.num_processes}" if not s.auto else f"this process ({s.source})")
    at = s.coordinator or "the coordinator jax.distributed detected"
    if worker.is_alive():
        if s.process_id == 0:
            why = (f"waited {s.timeout_s:g} s as coordinator at {at} (from {s.source}) and not all "
                   f"{s.num_processes} processes arrived: start every process with the same coordinator and "
                   "num_processes and process ids 0..n-1")
        else:
            why = (f"could not join the coordinator at {at} (from {s.source}) within {s.timeout_s:g} s: is "
                   "process 0 running there, on that host and port, reachable through the firewall, and are all "
                   "processes started?")
        raise JaxftError(f"jax.distributed: {who} {why}; or raise parallel.distributed.timeout_s")
    if failure:
        raise JaxftError(f"jax.distributed: {who} failed to connect to {at} (from {s.source}): "
                         f"{str(failure[0]).splitlines()[0] if str(failure[0]) else type(failure[0]).__name__}")
    _state["initialized"] = True
    return s


def is_primary() -> bool:
    """True on the process that writes what a run writes once (process 0)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op for one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_ints(values: list[int]) -> np.ndarray:
    """`int32[processes, len(values)]`: each process's `values`, on every process (one small all-gather; none with
    one process). Every process must call it at the same point of the program."""
    mine = np.asarray(values, np.int32).reshape(1, -1)
    if jax.process_count() == 1:
        return mine
    return np.asarray(multihost_utils.process_allgather(mine[0])).reshape(jax.process_count(), -1)


def agree(flag: bool) -> bool:
    """`flag` or-ed over all processes (see `gather_ints`)."""
    return bool(gather_ints([int(bool(flag))]).any())


def put_global(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """An array of `sharding` from a host value every process holds in full (e.g. a small adapter initialised
    with the same key everywhere): each process places only its own shards. Works for one process too, where
    `jax.device_put` would do."""
    host = np.asarray(value)
    return array_from_blocks(host.shape, sharding, lambda index: host[index])


def array_from_blocks(shape: tuple[int, ...], sharding: jax.sharding.Sharding,
                      read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """`jax.make_array_from_callback(shape, sharding, read)`, one local device at a time: each block `read(index)`
    returns is on its device before the next is read, so the host holds one block beyond the arrays.
    (`make_array_from_callback` reads every local block first: on a CPU host, where the arrays are host memory too,
    that doubles the process's part of the leaf.)"""
    arrays = []
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        arrays.append(jax.device_put(read(index), device).block_until_ready())
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def host_array(x: jax.Array) -> np.ndarray:
    """The whole value of `x` in host memory, on every process: a copy of the addressable data when this process
    holds all of it, else an all-gather across processes (every process must call it then, for the same array).
    Call it on one tensor at a time: it holds the whole tensor."""
    if getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False):
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def process_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], axis: int = 0) -> slice:
    """The rows (along `axis`) of a `global_shape` array of `sharding` whose shards lie on this process's devices:
    the share of a global batch this process builds and feeds. Raises `ConfigError` when they are not one
    contiguous range (a mesh whose data axes interleave processes)."""
    n = global_shape[axis]
    spans = sorted({(idx[axis].start or 0, n if idx[axis].stop is None else idx[axis].stop)
                    for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()})
    end = spans[0][1]
    for start, stop in spans[1:]:
        if start > end:
            raise ConfigError(f"process {jax.process_index()}: its devices hold rows {spans} of the global batch, "
                              "not one range; build the mesh with the data-parallel axes over processes first")
        end = max(end, stop)
    return slice(spans[0][0], end)


def global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                 global_shape: tuple[int, ...]) -> dict[str, jax.Array]:
    """A batch of global arrays of `global_shape` and `sharding` from this process's share of each entry (the rows
    `process_rows` names; the whole batch for one process)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v), tuple(global_shape))
            for k, v in local.items()}
