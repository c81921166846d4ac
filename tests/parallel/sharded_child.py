"""Run by tests/parallel/test_sharded_training.py in a fresh process with 8 fake CPU devices (the device count is
fixed when jax starts, and the rest of the suite runs on one device): trains a tiny random Llama, fully and with
LoRA, for 5 steps on one device and on the meshes (data, fsdp, tensor) = (8,1,1), (1,8,1), (2,2,2), (1,4,2), and
writes what the tests judge as JSON to argv[1]: losses, PartitionSpecs, per-device FLOPs and argument bytes of the
compiled steps, a checkpoint restored under other meshes, and whether a caller's arrays survive the donating steps."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jaxft import parallel, peft  # noqa: E402
from jaxft.models.config import LlamaConfig  # noqa: E402
from jaxft.models.llama import ModelOptions  # noqa: E402
from jaxft.models.params import init_params  # noqa: E402
from jaxft.parallel import MeshShape, ParallelSection  # noqa: E402
from jaxft.train.checkpoint import Checkpointer  # noqa: E402
from jaxft.train.optim import OptimConfig, make_optimizer  # noqa: E402
from jaxft.train.sharded import place_session_trees, placement, run_mesh  # noqa: E402
from jaxft.train.step import StaticModel, make_train_step  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
RULES = "fsdp+tensor"
STEPS, BATCH, SEQ = 5, 8, 32
# Big enough that the matmuls of every row dominate the FLOPs and the weight matrices the bytes (norms are 0.2%),
# small enough to compile in seconds. LoRA r=2: its B factors on q/k/v/gate/up are replicated under fsdp (their
# output axis is a heads / mlp axis), as in a real run where the adapter is under 1% of the model.
CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False,
                     model_type="llama")


def section(shape) -> ParallelSection:
    d, f, t = shape
    return ParallelSection(mesh=MeshShape(data=d, fsdp=f, tensor=t), rules=RULES)


def batches(seed: int):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, CONFIG.vocab_size, (1, BATCH, SEQ)).astype(np.int32)
        seg = np.ones_like(ids)
        seg[:, :, -4:] = 0  # right padding
        pos = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()
        mask = (rng.random(ids.shape) < 0.7) & (seg > 0)
        out.append({"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": mask})
    return out


def setup(method: str):
    params = init_params(CONFIG, jax.random.key(0))
    if method == "full":
        spec, trainable, frozen = None, params, None
    else:
        spec = peft.LoraSpec(r=2, alpha=4, target_modules="all-linear")
        trainable, frozen = peft.init(spec, CONFIG, params, jax.random.key(1)), params
        # a non-zero B so that every factor gets gradient from step 1
        trainable = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    opt = make_optimizer(OptimConfig(lr=1e-2, weight_decay=0.1), trainable, STEPS)
    if spec is not None:
        opt = optax.chain(opt, peft.mask_updates(peft.trainable_mask(spec, frozen, trainable)))
    return StaticModel(CONFIG, spec, ModelOptions()), opt, trainable, frozen


def cost(compiled) -> dict:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    ma = compiled.memory_analysis()
    return {"flops": float(ca["flops"]), "argument_bytes": int(ma.argument_size_in_bytes),
            "temp_bytes": int(ma.temp_size_in_bytes)}


def run(method: str, shape, data) -> dict:
    model, opt, trainable, frozen = setup(method)
    opt_state = opt.init(trainable)
    caller = trainable
    caller_before = [np.asarray(x) for x in jax.tree.leaves(caller)]
    where = None
    if shape is not None:
        mesh = run_mesh(section(shape))
        where = placement(mesh, RULES, CONFIG, model.spec, trainable, frozen, opt_state)
        trainable, frozen, opt_state = place_session_trees(where, trainable, frozen, opt_state)
    step = make_train_step(model, opt, where)
    stacked = {k: jnp.asarray(v) for k, v in data[0].items()}
    if where is not None:
        stacked = jax.device_put(stacked, where.batch)
    compiled = step.lower(trainable, opt_state, frozen, stacked, jax.random.key(3)).compile()
    losses = []
    for i, b in enumerate(data):
        b = {k: jnp.asarray(v) for k, v in b.items()}
        trainable, opt_state, m = step(trainable, opt_state, frozen, b, jax.random.fold_in(jax.random.key(3), i))
        losses.append(float(m["loss"]))
    out = {"losses": losses, **cost(compiled)}
    if where is not None:
        leaves = jax.tree_util.tree_leaves_with_path(where.trainable, is_leaf=lambda x: hasattr(x, "spec"))
        out["specs"] = {jax.tree_util.keystr(p): str(tuple(s.spec)) for p, s in leaves}
        out["param_bytes_per_device"] = int(sum(
            a.addressable_shards[0].data.nbytes for a in jax.tree.leaves((trainable, opt_state, frozen))))
    else:
        out["param_bytes_per_device"] = int(sum(a.nbytes for a in jax.tree.leaves((trainable, opt_state, frozen))))
    if where is not None:
        # the caller's tree, placed (replicated leaves would alias it) and donated by 5 steps, is alive and unchanged
        out["caller_leaves_deleted"] = int(sum(x.is_deleted() for x in jax.tree.leaves(caller)))
        out["caller_unchanged"] = all(np.array_equal(np.asarray(x), b)
                                      for x, b in zip(jax.tree.leaves(caller), caller_before))
        out["plain_device_put_aliases"] = any(
            jax.device_put(x, where.replicated).addressable_shards[0].data.unsafe_buffer_pointer()
            == x.unsafe_buffer_pointer() for x in jax.tree.leaves(caller))
    return out, {"trainable": trainable, "opt_state": opt_state}


def restore_under_other_meshes(method: str, state: dict) -> dict:
    """Checkpoint the state trained on (1,8,1) and restore it into (2,2,2) shardings and onto one device."""
    model, opt, _, _ = setup(method)
    saved = jax.tree.map(np.asarray, state)
    out = {}
    with tempfile.TemporaryDirectory() as d, Checkpointer(d, keep_last=1) as ckpt:
        ckpt.save(STEPS, state, extra={"step": STEPS})
        ckpt.wait()
        _, _, t0, f0 = setup(method)
        o0 = opt.init(t0)
        mesh2 = run_mesh(section((2, 2, 2)))
        where2 = placement(mesh2, RULES, CONFIG, model.spec, t0, f0, o0)
        t2, _, o2 = place_session_trees(where2, t0, f0, o0)
        for name, target in (("2x2x2", {"trainable": t2, "opt_state": o2}),
                             ("one_device", {"trainable": t0, "opt_state": o0})):
            restored, _ = ckpt.restore(target, STEPS)
            same = all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(restored),
                                                                          jax.tree.leaves(saved)))
            shardings_kept = all(a.sharding == t.sharding for a, t in
                                 zip(jax.tree.leaves(restored), jax.tree.leaves(target)))
            out[name] = {"equal": same, "target_shardings": shardings_kept,
                         "devices": len(jax.tree.leaves(restored)[0].sharding.device_set)}
    return out


def main(path: str) -> None:
    assert len(jax.devices()) == 8, jax.devices()
    data = batches(0)
    result = {"jax": jax.__version__}
    t0 = time.process_time()
    result["restore"] = {}
    for method in ("full", "lora"):
        result[method] = {"1x1x1": run(method, None, data)[0]}
        for shape in MESHES:
            name = "x".join(map(str, shape))
            result[method][name], state = run(method, shape, data)
            if shape == (1, 8, 1):
                result["restore"][method] = restore_under_other_meshes(method, state)
    result["cpu_s"] = time.process_time() - t0
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
