"""Child processes for tests/train/test_checkpoint.py: what must happen in a process of its own.

    python tests/train/ckpt_child.py kill DIR      # save step 1, start saving step 2, SIGKILL itself mid-write
    python tests/train/ckpt_child.py loop DIR      # fake training loop: stops, saves and exits 0 on SIGTERM
    python tests/train/ckpt_child.py sharded DIR   # 2 CPU devices: restore into a different sharding
"""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

LEAVES, LEAF_ELEMS = 8, 2**20  # 8 x 4 MiB fp32 = 32 MiB: its write takes ~0.3 s, far longer than the kill


def big_state(seed: int) -> dict:
    """A 32 MiB state whose values depend on `seed` (the parent rebuilds it to compare bitwise)."""
    keys = jax.random.split(jax.random.key(seed), LEAVES)
    return {f"w{i}": jax.random.normal(k, (LEAF_ELEMS,), jnp.float32) for i, k in enumerate(keys)}


def loop_state(step: int) -> dict:
    """The fake loop's state after `step` steps."""
    return {"x": jnp.full((16,), step, jnp.float32), "key": jax.random.fold_in(jax.random.key(0), step)}


def kill(directory: str) -> None:
    from jaxft.train.checkpoint import Checkpointer

    ckpt = Checkpointer(directory, keep_last=3)
    ckpt.save(1, big_state(1), extra={"step": 1})
    ckpt.wait()
    ckpt.save(2, big_state(2), extra={"step": 2})  # async: returns while the write goes on
    os.kill(os.getpid(), signal.SIGKILL)


def loop(directory: str) -> None:
    from jaxft.train.checkpoint import Checkpointer
    from jaxft.train.signals import StopSignal

    with Checkpointer(directory, keep_last=2) as ckpt, StopSignal() as stop:
        step = 0
        while True:
            step += 1
            state = loop_state(step)
            if step % 7 == 0:
                ckpt.save(step, state, extra={"position": step})
            if step == 3:
                print("ready", flush=True)
            if stop.requested:
                ckpt.save(step, state, extra={"position": step})
                print(f"stopped {step} {stop.signal_name}", flush=True)
                break
            time.sleep(0.01)


def sharded(directory: str) -> None:
    jax.config.update("jax_num_cpu_devices", 2)
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxft.train.checkpoint import Checkpointer

    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    saved = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    with Checkpointer(directory) as ckpt:
        ckpt.save(1, {"x": saved}, extra={})
        for spec in (P(None, "d"), P()):
            target = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))}
            restored, _ = ckpt.restore(target)
            assert restored["x"].sharding == target["x"].sharding, (restored["x"].sharding, spec)
            assert np.array_equal(np.asarray(restored["x"]), x)
    print("sharded ok", flush=True)


if __name__ == "__main__":
    {"kill": kill, "loop": loop, "sharded": sharded}[sys.argv[1]](sys.argv[2])
