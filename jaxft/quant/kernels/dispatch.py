"""Which implementation computes an NF4 product: the Pallas kernel for the running backend (Triton on GPU, Mosaic
on TPU) where the shape tiles, else plain XLA (dequantize, then `dot`), which is also the oracle the kernels are
tested against. A shape a kernel cannot tile takes the XLA path with one log line per shape, never a wrong answer.

`matmul` is a `jax.custom_vjp` (a `pallas_call` has no transpose rule): its backward computes only the input
gradient `g @ W^T` (with the transposed kernel) and keeps only the packed weight and the fp32 absmax as residuals;
the quantised weight gets no gradient (zeros for absmax, float0 for the codes).
"""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.quant.bnb_format import BLOCK, NF4_CODES
from jaxft.quant.kernels import pallas_nf4 as pk
from jaxft.quant.layout import CHUNK, unpack

log = logging.getLogger(__name__)
_LOGGED: set = set()
XLA_TILE = 1 << 22  # dequantised values per step of the XLA path's loop over a large weight (16 MiB in fp32)


def platform() -> str:
    """`"gpu"`, `"tpu"` or `"cpu"`: the backend the default device runs on."""
    return jax.default_backend()


def xla_dequantize(codes: jax.Array, absmax: jax.Array, dtype) -> jax.Array:
    """Dense `W[K, N]` from packed codes `[K/2, N]` and fp32 absmax `[K/64, N]`: `fp32(code * absmax)` in `dtype`.

    The codes are unpacked by a constant row take and per-row shift (`layout.unpack`, not a concatenation of
    slices) and each block of 64 rows is scaled by a broadcast absmax, so XLA computes it as one loop fusion (the table lookup included) writing only `W`. Unpacked
    by slices, the int32 codes were a buffer of their own: 4 bytes per weight, 172 MiB for one Llama-2-7B MLP
    matrix. (A select tree on the code bits instead of the lookup made XLA:CPU keep 16 full-size broadcast
    constants per weight inside the layer loop.)"""
    k, n = 2 * codes.shape[-2], codes.shape[-1]
    vals = jnp.asarray(NF4_CODES)[unpack(codes)].reshape(k // BLOCK, BLOCK, n)
    return (vals * absmax[:, None, :]).reshape(k, n).astype(dtype)


def row_block(k: int, n: int) -> int:
    """Rows of `W[k, n]` the XLA path dequantises per step: all `k` when W has at most `XLA_TILE` values, else the
    largest multiple of `CHUNK` (whole packing chunks: a contiguous slice of the codes) dividing `k` whose block has
    at most `XLA_TILE` values (at least one chunk); all `k` when `k` is not a multiple of `CHUNK`."""
    if k * n <= XLA_TILE or k % CHUNK:
        return k
    fits = [r for r in range(CHUNK, k, CHUNK) if k % r == 0 and r * n <= XLA_TILE]
    return max(fits, default=CHUNK)


def _row_block_of(codes, absmax, i, kb, dtype):
    """Rows `[i * kb, (i + 1) * kb)` of W, dequantised in `dtype`."""
    c = jax.lax.dynamic_slice_in_dim(codes, i * (kb // 2), kb // 2, 0)
    s = jax.lax.dynamic_slice_in_dim(absmax, i * (kb // BLOCK), kb // BLOCK, 0)
    return xla_dequantize(c, s, dtype)


def _xla_matmul(a: jax.Array, codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """`a[M, K] @ W` in plain XLA. A large W is dequantised a block of rows at a time inside a loop, its products
    summed in fp32: the whole dequantised weight never exists (XLA:CPU kept all seven of a Llama-2-7B layer's,
    in fp32, live at once: 775 MB of the QLoRA step's plan; the Pallas kernels never write it either)."""
    k, n = 2 * codes.shape[0], codes.shape[1]
    kb = row_block(k, n)
    if kb == k:
        return a @ xla_dequantize(codes, absmax, a.dtype)

    def step(i, acc):
        a_i = jax.lax.dynamic_slice_in_dim(a, i * kb, kb, 1)
        return acc + jnp.matmul(a_i, _row_block_of(codes, absmax, i, kb, a.dtype), preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, k // kb, step, jnp.zeros((a.shape[0], n), jnp.float32)).astype(a.dtype)


def _xla_matmul_t(a: jax.Array, codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """`a[M, N] @ W^T` in plain XLA, a large W a block of rows (columns of the result) at a time."""
    k, n = 2 * codes.shape[0], codes.shape[1]
    kb = row_block(k, n)
    if kb == k:
        return a @ xla_dequantize(codes, absmax, a.dtype).T

    def step(i, out):
        part = jnp.matmul(a, _row_block_of(codes, absmax, i, kb, a.dtype).T, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, part.astype(a.dtype), i * kb, 1)

    return jax.lax.fori_loop(0, k // kb, step, jnp.zeros((a.shape[0], k), a.dtype))


def tiles(kind: str, plat: str, m: int, k: int, n: int) -> dict | None:
    """Tile sizes of kernel `kind` ("matmul", "matmul_t", "dequantize") on `plat` for the shape, or None when the
    kernel cannot tile it (then the XLA path runs)."""
    if plat == "tpu":
        if k % pk.TPU_K or n % 128:
            return None
        bn = 256 if n % 256 == 0 else 128
        return {"bn": bn} if kind == "dequantize" else {"bm": 256 if m >= 256 else 8 * math.ceil(m / 8), "bn": bn}
    if plat in ("gpu", "triton"):
        if k % (2 * pk.HALF) or n % 64:
            return None
        bn = 128 if n % 128 == 0 else 64
        if kind == "dequantize":
            return {"bn": bn}
        return {"bm": 16 if m <= 16 else (32 if m <= 32 else 64), "bn": bn}
    return None


def _untiled(kind, plat, shape) -> None:
    key = (kind, plat, shape)
    if plat != "cpu" and key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("NF4 %s: shape %s does not tile for the %s kernel; using the XLA path", kind, shape, plat)


def run(kind: str, a: jax.Array, codes: jax.Array, absmax: jax.Array, *, plat: str | None = None,
        interpret: bool = False, dtype=None) -> jax.Array:
    """One NF4 kernel on 2-D operands: "matmul" `a[M, K] @ W`, "matmul_t" `a[M, N] @ W^T`, "dequantize" `W` (a
    unused, `dtype` given). `plat` ("gpu"/"triton", "tpu", "cpu") defaults to the running backend; `interpret`
    runs the Pallas kernel in interpret mode (CPU tests)."""
    plat = plat or platform()
    k, n = 2 * codes.shape[0], codes.shape[1]
    m = 0 if kind == "dequantize" else a.shape[0]
    t = tiles(kind, plat, m, k, n)
    if t is None:
        _untiled(kind, plat, (m, k, n))
        if kind == "dequantize":
            return xla_dequantize(codes, absmax, dtype)
        return _xla_matmul(a, codes, absmax) if kind == "matmul" else _xla_matmul_t(a, codes, absmax)
    fn = {("tpu", "matmul"): pk.tpu_matmul, ("tpu", "matmul_t"): pk.tpu_matmul_t,
          ("tpu", "dequantize"): pk.tpu_dequantize}.get((plat, kind)) or {
        "matmul": pk.gpu_matmul, "matmul_t": pk.gpu_matmul_t, "dequantize": pk.gpu_dequantize}[kind]
    if kind == "dequantize":
        return fn(codes, absmax, dtype, interpret=interpret, **t)
    return fn(a, codes, absmax, interpret=interpret, **t)


@jax.custom_vjp
def matmul(x: jax.Array, codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """`x[..., K] @ W[K, N]` for an NF4 weight (codes `[K/2, N]`, fp32 absmax `[K/64, N]`), in `x.dtype`."""
    return _matmul_fwd(x, codes, absmax)[0]


def _matmul_fwd(x, codes, absmax):
    x2 = x.reshape(-1, x.shape[-1])
    y = run("matmul", x2, codes, absmax)
    return y.reshape(*x.shape[:-1], codes.shape[1]), (codes, absmax)


def _matmul_bwd(res, g):
    codes, absmax = res
    g2 = g.reshape(-1, g.shape[-1])
    gx = run("matmul_t", g2, codes, absmax).reshape(*g.shape[:-1], 2 * codes.shape[0])
    return gx, np.zeros(codes.shape, jax.dtypes.float0), jnp.zeros_like(absmax)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
