"""How long `Checkpointer.save` blocks the caller, asynchronous vs synchronous, for a ~50 MB state.

    python tests/train/ckpt_bench.py [--mb 50] [--repeats 3]

Prints the median of `repeats` saves: time inside `save()` (what the training loop waits for) and until the
checkpoint is on disk (`save()` + `wait()`).
"""

import argparse
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from jaxft.train.checkpoint import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n_leaves = 8
    per_leaf = int(args.mb * 2**20 / 4 / n_leaves)
    keys = jax.random.split(jax.random.key(0), n_leaves)
    state = {f"w{i}": jax.random.normal(k, (per_leaf,), jnp.float32) for i, k in enumerate(keys)}
    jax.block_until_ready(state)
    size_mb = sum(x.nbytes for x in state.values()) / 2**20
    for async_save in (True, False):
        blocked, total = [], []
        with tempfile.TemporaryDirectory() as d, Checkpointer(d, keep_last=1, async_save=async_save) as ckpt:
            for step in range(args.repeats + 1):  # step 0 warms up Orbax's threads and tensorstore
                t0 = time.perf_counter()
                ckpt.save(step, state, extra={"step": step})
                t1 = time.perf_counter()
                ckpt.wait()
                t2 = time.perf_counter()
                if step:
                    blocked.append(t1 - t0)
                    total.append(t2 - t0)
        mode = "async" if async_save else "sync "
        print(
            f"{mode}: {size_mb:.0f} MB state: save() blocks {statistics.median(blocked) * 1e3:7.1f} ms, "
            f"on disk after {statistics.median(total) * 1e3:7.1f} ms (median of {args.repeats})"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
