"""The chunked loss on 8 fake CPU devices against the same loss on one device (run by
`tests/ops/test_loss.py::test_vocab_parallel_on_a_mesh_matches_one_device` in its own process: the device count is
fixed when jax starts). Prints one JSON object: per case the largest errors (relative to the largest reference
entry) of the loss and both gradients, the head gradient's PartitionSpec and the compiled step's temporary bytes
next to the bytes of the fp32 head."""

from __future__ import annotations

import json
import os

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from jaxft.ops.loss import causal_lm_loss  # noqa: E402

B, T, D = 8, 256, 64


def _err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def case(mesh_shape, v, head_spec, transposed, seed):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    w = (rng.standard_normal((D, v)) / np.sqrt(D) * 3).astype(np.float32)
    w = np.ascontiguousarray(w.T) if transposed else w
    ids = rng.integers(0, v, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.7
    seg = np.repeat(np.array([[1] * (T // 2) + [2] * (T // 4) + [0] * (T // 4)]), B, axis=0).astype(np.int32)

    def f(h, w):
        return causal_lm_loss(h, w, ids, mask, seg, chunk_size=64, transposed=transposed)[0]

    grad = jax.value_and_grad(f, argnums=(0, 1))
    ref = jax.jit(grad)(h, w)
    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    hs = jax.device_put(h, NamedSharding(mesh, P(("data", "fsdp"))))
    ws = jax.device_put(w, NamedSharding(mesh, head_spec))
    with jax.set_mesh(mesh):
        compiled = jax.jit(grad).lower(hs, ws).compile()
        loss, (gh, gw) = compiled(hs, ws)
    return {"loss": _err(loss, ref[0]), "dh": _err(gh, ref[1][0]), "dw": _err(gw, ref[1][1]),
            "dw_spec": str(tuple(gw.sharding.spec)), "temp": int(compiled.memory_analysis().temp_size_in_bytes),
            "head_fp32": D * v * 4}


def main() -> None:
    out = {
        # fsdp+tensor on a (2, 2, 2) mesh: the head's model dimension on fsdp, its vocabulary on tensor; in the loss
        # the vocabulary splits over all 8 devices
        "vocab_parallel": case((2, 2, 2), 8192, P("fsdp", "tensor"), False, 0),
        # a tied [V, D] table whose vocabulary the 8 devices do not divide: the chunks stay split by rows
        "odd_vocab": case((1, 8, 1), 1003, P(None, "fsdp"), True, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
