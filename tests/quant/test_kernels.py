"""NF4 Pallas kernels against the plain-XLA reference (`dispatch.xla_dequantize` then `dot`) in interpret mode, on
fresh random weights and inputs of several shapes (ragged row counts included), for the TPU (Mosaic) and GPU
(Triton) kernel bodies; and each kernel lowered for real on this CPU with `jax.export` (Mosaic TPU; Triton for
CUDA), which checks what interpret mode ignores (block shapes, dtypes, dot dims).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxft.quant import nf4
from jaxft.quant.kernels import dispatch
from jaxft.quant.kernels import pallas_nf4 as pk

# Largest |kernel - reference| / max|reference| measured over the cases below, both kernel bodies (fp32 inputs, fp32
# accumulation; the kernel sums the K halves in another order): 8.2e-7. Tolerance 3e-6 (3.7x).
RTOL = 3e-6


def _weight(key, k, n, double_quant=False):
    w = jax.random.normal(key, (k, n), jnp.float32) * 0.05
    return nf4.quantize(w, double_quant=double_quant)


def _ref(kind, a, t):
    w = dispatch.xla_dequantize(t.codes, t.absmax_f32(), jnp.float32)
    return {"matmul": lambda: a @ w, "matmul_t": lambda: a @ w.T, "dequantize": lambda: w}[kind]()


def _rel(got, want):
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))


CASES = [(1, 512, 128), (5, 512, 256), (37, 1024, 384), (130, 512, 128)]


@pytest.mark.parametrize("plat", ["tpu", "triton"])
@pytest.mark.parametrize("m,k,n", CASES)
def test_kernels_match_reference_in_interpret_mode(plat, m, k, n):
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(m * 7 + n), 3)
    t = _weight(kw, k, n, double_quant=(m % 2 == 1))
    a = jnp.asarray(t.absmax_f32())
    x = jax.random.normal(kx, (m, k), jnp.float32)
    g = jax.random.normal(kg, (m, n), jnp.float32)
    assert dispatch.tiles("matmul", plat, m, k, n) is not None  # the kernel, not the fallback, runs
    y = dispatch.run("matmul", x, t.codes, a, plat=plat, interpret=True)
    assert y.shape == (m, n) and _rel(y, _ref("matmul", x, t)) < RTOL
    gx = dispatch.run("matmul_t", g, t.codes, a, plat=plat, interpret=True)
    assert gx.shape == (m, k) and _rel(gx, _ref("matmul_t", g, t)) < RTOL
    w = dispatch.run("dequantize", None, t.codes, a, plat=plat, interpret=True, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(_ref("dequantize", None, t)))  # exact: same products


def test_untiled_shapes_take_the_xla_path_once_logged(caplog):
    """SmolLM2's 576 rows do not tile (K % 512 on TPU, % 256 on Triton): the XLA path runs and says so once."""
    t = _weight(jax.random.PRNGKey(0), 576, 192)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 576), jnp.float32)
    with caplog.at_level(logging.WARNING, logger=dispatch.__name__):
        for _ in range(2):
            y = dispatch.run("matmul", x, t.codes, t.absmax_f32(), plat="tpu")
    assert _rel(y, _ref("matmul", x, t)) < RTOL
    assert sum("does not tile" in r.message for r in caplog.records) == 1


def _gpu_mesh():
    """jax 0.12 lowers Triton only for a named GPU: an abstract H100 (jax 0.10 needs none)."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return None
    dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="cuda")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev))


@pytest.mark.parametrize("plat", ["tpu", "cuda"])
@pytest.mark.parametrize("m", [16, 256])
def test_kernels_lower_for_real(plat, m):
    k, n = 1024, 512
    c = jax.ShapeDtypeStruct((k // 2, n), jnp.uint8)
    a = jax.ShapeDtypeStruct((k // 64, n), jnp.float32)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    g = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    kp = "tpu" if plat == "tpu" else "triton"
    fns = [(lambda x_, c_, a_: dispatch.run("matmul", x_, c_, a_, plat=kp), (x, c, a)),
           (lambda g_, c_, a_: dispatch.run("matmul_t", g_, c_, a_, plat=kp), (g, c, a)),
           (lambda c_, a_: dispatch.run("dequantize", None, c_, a_, plat=kp, dtype=jnp.bfloat16), (c, a))]
    checks = [] if plat == "tpu" else [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    mesh = _gpu_mesh() if plat == "cuda" else None
    for fn, args in fns:
        if mesh is None:
            exp = export.export(jax.jit(fn), platforms=[plat], disabled_checks=checks)(*args)
        else:
            with mesh:
                exp = export.export(jax.jit(fn), platforms=[plat], disabled_checks=checks)(*args)
        text = exp.mlir_module()
        assert ("tpu_custom_call" in text) if plat == "tpu" else ("__gpu$xla.gpu.triton" in text)


@pytest.mark.parametrize("k,n", [(512, 128), (320, 64), (64, 192), (1088, 96)])
def test_xla_dequantize_is_the_oracle_bit_for_bit_in_one_fusion(k, n):
    """The XLA path (codes unpacked by a reshape, blocks scaled by a broadcast absmax) equals `nf4.dequantize`
    exactly, whole and ragged packing chunks alike, and compiles to one fusion that writes only the weight (unpacked
    by slices, the int32 codes were a buffer of their own: 4 bytes per element)."""
    t = _weight(jax.random.PRNGKey(k + n), k, n, double_quant=k % 128 == 0)
    got = dispatch.xla_dequantize(t.codes, t.absmax_f32(), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(nf4.dequantize(t, jnp.float32)))
    hlo = jax.jit(dispatch.xla_dequantize, static_argnums=2).lower(
        t.codes, t.absmax_f32(), jnp.bfloat16).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):].split("\n}")[0].splitlines()[1:]
    ops = [line.split(" = ", 1)[1].split("(")[0].split()[-1] for line in entry if " = " in line]
    assert [op for op in ops if op not in ("parameter", "constant")] == ["fusion"], ops


@pytest.mark.parametrize("m,k,n,blocks", [(7, 1024, 96, 4), (3, 768, 64, 3), (5, 1088, 96, 1)])
def test_xla_path_loops_over_row_blocks_of_a_large_weight(monkeypatch, m, k, n, blocks):
    """The XLA path (CPU, and shapes no kernel tiles) dequantises a weight above `XLA_TILE` values a block of whole
    packing chunks at a time: the same products and input gradients as the whole dequantised weight (fp32; the
    blocks' partial sums add in another order: measured <= 9.3e-7 over 5 seeds and 3 shapes, RTOL 3e-6: 3.2x). Here `XLA_TILE` is lowered to
    256 x n so small shapes loop; 1088 rows are not whole chunks of 256 and are dequantised at once."""
    monkeypatch.setattr(dispatch, "XLA_TILE", 256 * n)
    assert k // dispatch.row_block(k, n) == blocks
    kw, kx, kg = jax.random.split(jax.random.key(k + n), 3)
    t = _weight(kw, k, n, double_quant=True)
    a = jax.random.normal(kx, (m, k), jnp.float32)
    g = jax.random.normal(kg, (m, n), jnp.float32)
    for kind, x in (("matmul", a), ("matmul_t", g)):
        got = jax.jit(lambda x_: dispatch.run(kind, x_, t.codes, t.absmax_f32(), plat="cpu"))(x)
        assert _rel(got, _ref(kind, x, t)) <= RTOL, kind
    loss = lambda x_: jnp.sum(dispatch.matmul(x_, t.codes, t.absmax_f32()) * g)
    assert _rel(jax.grad(loss)(a), _ref("matmul_t", g, t)) <= RTOL


def test_xla_path_never_holds_a_large_weight_dequantised():
    """A 4096 x 4096 NF4 weight (64 MiB in fp32) times 64 rows, forward and input gradient: the compiled temporaries
    stay under half of the dequantised weight (one 1024-row block is 16 MiB; measured: forward 18,089,028, backward
    19,137,732 bytes; the whole weight at once would be 67,108,864 and more)."""
    k = n = 4096
    t = _weight(jax.random.key(0), k, n)
    x = jax.ShapeDtypeStruct((64, k), jnp.float32)
    dense = k * n * 4
    fwd = jax.jit(lambda x_: dispatch.matmul(x_, t.codes, t.absmax_f32())).lower(x).compile()
    bwd = jax.jit(jax.grad(lambda x_: jnp.sum(dispatch.matmul(x_, t.codes, t.absmax_f32()) ** 2))).lower(x).compile()
    temps = [c.memory_analysis().temp_size_in_bytes for c in (fwd, bwd)]
    print("temporaries", temps)
    assert max(temps) < dense / 2
