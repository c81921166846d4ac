"""One process of the multi-host test (tests/parallel/test_multihost.py launches it; not a test module itself).

    python tests/parallel/multihost_worker.py SPEC.json

SPEC: {"coordinator", "num_processes", "process_id", "timeout_s" (null: single process), "model", "memory_model"
(null: skip), "quant_model" (null: skip; loaded quantised to NF4 with FSDP over every device), "ckpt", "out", "mesh": [data, fsdp], "method": "lora"|"full", "steps", "signal_at" (null: none),
"signal_process", "export" (null, or where to write the merged model after the last step)}. It loads the tiny
model sharded over the global mesh, trains `steps` steps with jaxft's train step on global batches fed per process,
checkpoints every second step and at a stop (async Orbax, all processes), resumes from the latest
checkpoint when there is one, and stops on SIGTERM where `StopSignal.poll` says so. It writes `out`/p<id>.json: the
step reached, the stop reason, the host memory measurements, the poll cost; process 0 also writes `out`/params.npz.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import tracemalloc

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jaxft  # noqa: E402
from jaxft import peft  # noqa: E402
from jaxft.data.batches import Batches  # noqa: E402
from jaxft.data.render import Example  # noqa: E402
from jaxft.models.llama import ModelOptions  # noqa: E402
from jaxft.parallel import distributed  # noqa: E402
from jaxft.train.checkpoint import Checkpointer  # noqa: E402
from jaxft.train.signals import StopSignal  # noqa: E402
from jaxft.train.step import StaticModel, make_train_step  # noqa: E402

BATCH, SEQ, ACCUM = 8, 16, 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one, so the peak read
    after the load is the load's own, not one left from start-up (jax's backend start peaks higher, then frees)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def fsdp_shardings(tree, mesh: Mesh):
    """The last axis over `fsdp` where it divides, else replicated: a hand-written FSDP layout for the test (the
    trainer's come from `jaxft.parallel`'s rules)."""
    n = mesh.shape["fsdp"]

    def one(x):
        if x.ndim and x.shape[-1] % n == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "fsdp"))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree)


def quantised_load(path: str) -> dict:
    """Load `path` quantised to NF4 (bf16, the trainer's defaults) with the trainer's FSDP rules over every device:
    the host memory numpy holds at its peak (tracemalloc: the dense slabs and NF4 buffers of this process, without
    malloc's per-thread arenas), the bytes this process's devices hold, and a digest of every gathered field."""
    from jaxft import parallel, quant
    from jaxft.models.params import logical_axes
    from jaxft.parallel.rules import shard_counts

    cfg = jaxft.load_config(path)
    plan = quant.QuantPlan()
    base = quant.abstract_quantized(jaxft.abstract_params(cfg, jnp.bfloat16), plan)
    mesh = parallel.make_mesh(parallel.ParallelSection(), jax.devices())  # default: FSDP over every device
    shardings = parallel.param_shardings(quant.tree_axes(logical_axes(cfg), base, shard_counts("fsdp", mesh)),
                                         "fsdp", mesh)
    tracemalloc.start()
    _, q = jaxft.load_pretrained(path, dtype="bfloat16", quantize=plan, shardings=shardings)
    jax.block_until_ready(q)
    _, host_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    leaves = jax.tree_util.tree_leaves_with_path(q)
    out = {"host_peak": host_peak, "model_bytes": sum(x.nbytes for _, x in leaves),
           "local_bytes": sum(s.data.nbytes for _, x in leaves for s in x.addressable_shards),
           "digests": {}}
    for p, x in leaves:  # every process takes part in each gather
        host = distributed.host_array(x)
        out["digests"][jax.tree_util.keystr(p)] = hashlib.sha256(host.view(np.uint8).tobytes()).hexdigest()
    return out


def examples(vocab: int) -> list[Example]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(24):
        n = int(rng.integers(6, SEQ + 1))
        ids = rng.integers(1, vocab, n).astype(np.int32)
        mask = np.ones(n, bool)
        mask[0] = False
        out.append(Example(ids, mask, 0, -1, None, 0, i))
    return out


def main(spec: dict) -> None:
    t0 = time.perf_counter()
    settings = distributed.initialize(
        None if spec["coordinator"] is None else {k: spec[k] for k in ("coordinator", "num_processes", "process_id",
                                                                       "timeout_s")})
    report = {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
              "distributed": settings is not None, "init_s": time.perf_counter() - t0}
    data_axes = ("data", "fsdp")
    mesh = Mesh(np.array(jax.devices()).reshape(spec["mesh"]), ("data", "fsdp"))

    if spec.get("memory_model"):  # first, while the process's peak RSS is still its baseline
        cfg = jaxft.load_config(spec["memory_model"])
        abstract = jaxft.abstract_params(cfg)
        reset_peak_rss()
        before = rss_bytes()
        fsdp_all = Mesh(np.array(jax.devices()).reshape(1, -1), ("data", "fsdp"))  # FSDP over every process
        _, big = jaxft.load_pretrained(spec["memory_model"], shardings=fsdp_shardings(abstract, fsdp_all))
        jax.block_until_ready(big)
        report["memory"] = {
            "rss_before": before, "peak_after": peak_rss_bytes(),
            "model_bytes": sum(x.nbytes for x in jax.tree.leaves(big)),
            "local_bytes": sum(s.data.nbytes for x in jax.tree.leaves(big) for s in x.addressable_shards)}
        del big

    if spec.get("quant_model"):
        report["quant"] = quantised_load(spec["quant_model"])

    report["loaded_big_s"] = time.perf_counter() - t0
    config = jaxft.load_config(spec["model"])
    _, params = jaxft.load_pretrained(spec["model"], shardings=fsdp_shardings(jaxft.abstract_params(config), mesh))
    replicated = NamedSharding(mesh, P())
    if spec["method"] == "lora":
        lora = peft.LoraSpec(r=4, alpha=8.0, target_modules="all-linear")
        # LoRA's init reads shapes only: one jitted init, its output placed on the mesh
        trainable = jax.jit(lambda key: peft.init(lora, config, jaxft.abstract_params(config), key),
                            out_shardings=replicated)(jax.random.key(1))
        frozen, model_spec = params, lora
    else:
        trainable = jax.jit(lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t))(params)
        frozen, model_spec = None, None
    optimizer = optax.adamw(1e-2)
    # optax's step count is created on one device, uncommitted: placed like the rest, or the step compiles twice
    opt_state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else
                             distributed.put_global(x, replicated), optimizer.init(trainable))
    rng = jax.jit(lambda: jax.random.key(3), out_shardings=replicated)()
    model = StaticModel(config, model_spec, ModelOptions(dtype=jnp.float32, remat="none", scan_layers=True))
    train_step = make_train_step(model, optimizer)

    exs = examples(config.vocab_size)
    batches = Batches(exs, [(i,) for i in range(len(exs))], BATCH, SEQ, 0, seed=5)
    batch_sharding = NamedSharding(mesh, P(None, data_axes))
    global_shape = (ACCUM, BATCH, SEQ)
    share = distributed.process_rows(batch_sharding, global_shape, axis=1)
    report["rows"] = [share.start, share.stop]

    report["setup_s"] = time.perf_counter() - t0
    ckpt = Checkpointer(spec["ckpt"], keep_last=2)
    step = 0
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore({"trainable": trainable, "opt_state": opt_state, "rng": rng})
        trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
        batches.restore(extra["data"])
        step = int(extra["step"])
        report["resumed_from"] = step
        report["saved_positions"] = extra["data_by_process"]
    stopped, poll_s = "completed", []
    with StopSignal() as stop:
        while step < spec["steps"]:
            micro = [batches.next_share(share) for _ in range(ACCUM)]
            local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
            batch = distributed.global_batch(local, batch_sharding, global_shape)
            key = jax.random.fold_in(rng, step)
            trainable, opt_state, metrics = train_step(trainable, opt_state, frozen, batch, key)
            float(metrics["loss"])
            step += 1
            if spec.get("signal_at") == step and jax.process_index() == spec.get("signal_process", 0):
                os.kill(os.getpid(), signal.SIGTERM)
            t = time.perf_counter()
            halt = stop.poll(step)
            poll_s.append(time.perf_counter() - t)
            if halt or step % 2 == 0 or step == spec["steps"]:
                # every process's data position, gathered: Orbax writes the JSON item from process 0 only
                positions = distributed.gather_ints([batches.epoch, batches.position, share.start, share.stop])
                extra = {"step": step, "data": batches.state(),
                         "data_by_process": [dict(zip(("epoch", "position", "row_start", "row_stop"), map(int, p)))
                                             for p in positions]}
                ckpt.save(step, {"trainable": trainable, "opt_state": opt_state, "rng": rng}, extra=extra)
            if step == 1:
                report["first_step_s"] = time.perf_counter() - t0
            if halt:
                stopped = f"{stop.signal_name} at step {step}"
                break
    ckpt.close()
    report.update(step=step, stopped=stopped, poll_s=poll_s, wall_s=time.perf_counter() - t0)
    if spec.get("export") and step == spec["steps"]:
        # the merged model from the sharded run: every process gathers each tensor, process 0 writes the directory
        merged = trainable if frozen is None else peft.merge(frozen, model_spec, trainable)
        jaxft.save_pretrained(config, merged, spec["export"])
        del merged
    host = jax.tree.map(distributed.host_array, trainable)  # every process takes part in the gathers
    if distributed.is_primary():
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(host)}
        np.savez(os.path.join(spec["out"], "params.npz"), **flat)
    with open(os.path.join(spec["out"], f"p{jax.process_index()}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        main(spec)
    except jaxft.JaxftError as e:  # as `python -m jaxft.train` reports it: one line
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
