"""Pallas kernels over NF4Tensor's storage (`codes` uint8 `[K/2, N]` in chunks of 256 rows, fp32 `absmax`
`[K/64, N]`; see `jaxft.quant.nf4`): dequantize, `x @ W` and `g @ W^T`, one lowering for TPU (Mosaic: the
reduction is the last grid axis with an fp32 VMEM accumulator) and one for GPU (Triton: the reduction is a loop
inside the program, ragged rows masked).

The NF4 decode is a select tree on the four code bits (15 selects), not a gather: it lowers on both backends and
stays in 32-bit elementwise ops (TPU has no 8/4-bit vector arithmetic). A 256-row chunk unpacks into two 128-row
halves (high and low nibbles), each covering two absmax blocks, so each half is one lane-aligned slice of `x` and
one MXU/tensor-core product. Tiles: TPU K step 512 (8 absmax rows: the (8, 128) tile rule), N tile 128/256; Triton
M tile 16..64 (dot dims >= 16), N tile 64/128. `dispatch` checks shapes before calling these.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltr

from jaxft.quant.bnb_format import NF4_CODES

HALF = 128  # rows per nibble half of a packing chunk
TPU_K = 512  # rows of K per TPU grid step (two chunks)


def decode(q: jax.Array) -> jax.Array:
    """NF4 code (an integer array, 0..15) -> fp32 value, as a select tree on the code's bits."""
    level = [jnp.float32(float(c)) for c in NF4_CODES]
    for bit in range(4):
        on = (q & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _half_weight(byte: jax.Array, half: int, a0: jax.Array, a1: jax.Array) -> jax.Array:
    """fp32 weights of one 128-row half from its packed bytes `[128, bn]` (int32): rows 0..63 scaled by `a0`
    `[1, bn]`, rows 64..127 by `a1`."""
    q = (byte >> 4) if half == 0 else (byte & 15)
    rows = jax.lax.broadcasted_iota(jnp.int32, q.shape, 0)
    return decode(q) * jnp.where(rows < 64, a0, a1)


# ---------------------------------------------------------------- TPU (Mosaic)

def _tpu_matmul_kernel(x_ref, c_ref, a_ref, o_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc = acc_ref[...]
    for ch in range(TPU_K // (2 * HALF)):
        byte = c_ref[pl.ds(ch * HALF, HALF), :].astype(jnp.int32)
        for half in range(2):
            r = ch * 4 + half * 2
            w = _half_weight(byte, half, a_ref[pl.ds(r, 1), :], a_ref[pl.ds(r + 1, 1), :])
            xs = x_ref[:, pl.ds(ch * 2 * HALF + half * HALF, HALF)]
            acc += jnp.dot(xs, w.astype(xs.dtype), preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tpu_matmul_t_kernel(g_ref, c_ref, a_ref, o_ref, acc_ref):
    j = pl.program_id(2)

    @pl.when(j == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    g = g_ref[...]
    for ch in range(TPU_K // (2 * HALF)):
        byte = c_ref[pl.ds(ch * HALF, HALF), :].astype(jnp.int32)
        for half in range(2):
            r = ch * 4 + half * 2
            w = _half_weight(byte, half, a_ref[pl.ds(r, 1), :], a_ref[pl.ds(r + 1, 1), :])
            part = jax.lax.dot_general(g, w.astype(g.dtype), (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32)  # [bm, 128]
            sl = pl.ds(ch * 2 * HALF + half * HALF, HALF)
            acc_ref[:, sl] += part

    @pl.when(j == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _tpu_dequant_kernel(c_ref, a_ref, o_ref):
    for ch in range(TPU_K // (2 * HALF)):
        byte = c_ref[pl.ds(ch * HALF, HALF), :].astype(jnp.int32)
        for half in range(2):
            r = ch * 4 + half * 2
            w = _half_weight(byte, half, a_ref[pl.ds(r, 1), :], a_ref[pl.ds(r + 1, 1), :])
            o_ref[pl.ds(ch * 2 * HALF + half * HALF, HALF), :] = w.astype(o_ref.dtype)


def _tpu_params(*sem):
    return pltpu.CompilerParams(dimension_semantics=sem)


def tpu_matmul(x, codes, absmax, *, bm, bn, interpret=False):
    """`x[M, K] @ W[K, N]` on TPU; K % 512 == 0, N % bn == 0 (M ragged: edge blocks are masked by Pallas)."""
    m, k = x.shape
    n = codes.shape[1]
    return pl.pallas_call(
        _tpu_matmul_kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(pl.cdiv(m, bm), n // bn, k // TPU_K),
        in_specs=[pl.BlockSpec((bm, TPU_K), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((TPU_K // 2, bn), lambda i, j, kk: (kk, j)),
                  pl.BlockSpec((TPU_K // 64, bn), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=_tpu_params("parallel", "parallel", "arbitrary"), interpret=interpret,
    )(x, codes, absmax)


def tpu_matmul_t(g, codes, absmax, *, bm, bn, interpret=False):
    """`g[M, N] @ W[K, N]^T` on TPU (the input gradient of `x @ W`)."""
    m, n = g.shape
    k = 2 * codes.shape[0]
    return pl.pallas_call(
        _tpu_matmul_t_kernel, out_shape=jax.ShapeDtypeStruct((m, k), g.dtype),
        grid=(pl.cdiv(m, bm), k // TPU_K, n // bn),
        in_specs=[pl.BlockSpec((bm, bn), lambda i, kk, j: (i, j)),
                  pl.BlockSpec((TPU_K // 2, bn), lambda i, kk, j: (kk, j)),
                  pl.BlockSpec((TPU_K // 64, bn), lambda i, kk, j: (kk, j))],
        out_specs=pl.BlockSpec((bm, TPU_K), lambda i, kk, j: (i, kk)),
        scratch_shapes=[pltpu.VMEM((bm, TPU_K), jnp.float32)],
        compiler_params=_tpu_params("parallel", "parallel", "arbitrary"), interpret=interpret,
    )(g, codes, absmax)


def tpu_dequantize(codes, absmax, dtype, *, bn, interpret=False):
    """Dense `W[K, N]` in `dtype` on TPU."""
    k, n = 2 * codes.shape[0], codes.shape[1]
    return pl.pallas_call(
        _tpu_dequant_kernel, out_shape=jax.ShapeDtypeStruct((k, n), dtype), grid=(k // TPU_K, n // bn),
        in_specs=[pl.BlockSpec((TPU_K // 2, bn), lambda kk, j: (kk, j)),
                  pl.BlockSpec((TPU_K // 64, bn), lambda kk, j: (kk, j))],
        out_specs=pl.BlockSpec((TPU_K, bn), lambda kk, j: (kk, j)),
        compiler_params=_tpu_params("parallel", "parallel"), interpret=interpret,
    )(codes, absmax)


# ---------------------------------------------------------------- GPU (Triton)

def _gpu_half(c_ref, a_ref, c, half, cols):
    byte = pltr.load(c_ref.at[pl.ds(c * HALF, HALF), cols]).astype(jnp.int32)
    r = c * 4 + half * 2
    return _half_weight(byte, half, pltr.load(a_ref.at[pl.ds(r, 1), cols]), pltr.load(a_ref.at[pl.ds(r + 1, 1), cols]))


def _gpu_matmul_kernel(x_ref, c_ref, a_ref, o_ref, *, m, bm, bn, chunks):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = pl.ds(i * bm, bm)
    cols = pl.ds(j * bn, bn)
    row_ok = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, HALF), 0)) < m

    def body(c, acc):
        for half in range(2):
            w = _gpu_half(c_ref, a_ref, c, half, cols)
            xs = pltr.load(x_ref.at[rows, pl.ds(c * 2 * HALF + half * HALF, HALF)], mask=row_ok, other=0)
            acc += jnp.dot(xs, w.astype(xs.dtype), preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros((bm, bn), jnp.float32))
    out_ok = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)) < m
    pltr.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=out_ok)


def _gpu_matmul_t_kernel(g_ref, c_ref, a_ref, o_ref, *, m, bm, bn, n_tiles):
    i, c = pl.program_id(0), pl.program_id(1)  # one 256-row chunk of K per program
    rows = pl.ds(i * bm, bm)
    g_ok = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)) < m

    def body(j, accs):
        cols = pl.ds(j * bn, bn)
        g = pltr.load(g_ref.at[rows, cols], mask=g_ok, other=0)
        out = []
        for half in range(2):
            w = _gpu_half(c_ref, a_ref, c, half, cols)
            out.append(accs[half] + jax.lax.dot_general(g, w.astype(g.dtype), (((1,), (1,)), ((), ())),
                                                        preferred_element_type=jnp.float32))
        return tuple(out)

    zero = jnp.zeros((bm, HALF), jnp.float32)
    accs = jax.lax.fori_loop(0, n_tiles, body, (zero, zero))
    out_ok = (i * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, HALF), 0)) < m
    for half in range(2):
        pltr.store(o_ref.at[rows, pl.ds(c * 2 * HALF + half * HALF, HALF)], accs[half].astype(o_ref.dtype),
                   mask=out_ok)


def _gpu_dequant_kernel(c_ref, a_ref, o_ref, *, bn):
    c, j = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * bn, bn)
    for half in range(2):
        w = _gpu_half(c_ref, a_ref, c, half, cols)
        pltr.store(o_ref.at[pl.ds(c * 2 * HALF + half * HALF, HALF), cols], w.astype(o_ref.dtype))


def _gpu_params(num_warps=4, num_stages=2):
    return pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def gpu_matmul(x, codes, absmax, *, bm, bn, interpret=False):
    """`x[M, K] @ W[K, N]` with Triton; K % 256 == 0, N % bn == 0, M any (masked)."""
    m, k = x.shape
    n = codes.shape[1]
    kernel = functools.partial(_gpu_matmul_kernel, m=m, bm=bm, bn=bn, chunks=k // (2 * HALF))
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m, n), x.dtype), grid=(pl.cdiv(m, bm), n // bn),
                          compiler_params=_gpu_params(), interpret=interpret)(x, codes, absmax)


def gpu_matmul_t(g, codes, absmax, *, bm, bn, interpret=False):
    """`g[M, N] @ W[K, N]^T` with Triton."""
    m, n = g.shape
    k = 2 * codes.shape[0]
    kernel = functools.partial(_gpu_matmul_t_kernel, m=m, bm=bm, bn=bn, n_tiles=n // bn)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((m, k), g.dtype),
                          grid=(pl.cdiv(m, bm), k // (2 * HALF)),
                          compiler_params=_gpu_params(), interpret=interpret)(g, codes, absmax)


def gpu_dequantize(codes, absmax, dtype, *, bn, interpret=False):
    """Dense `W[K, N]` in `dtype` with Triton."""
    k, n = 2 * codes.shape[0], codes.shape[1]
    kernel = functools.partial(_gpu_dequant_kernel, bn=bn)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((k, n), dtype), grid=(k // (2 * HALF), n // bn),
                          compiler_params=_gpu_params(), interpret=interpret)(codes, absmax)
