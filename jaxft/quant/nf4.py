"""`NF4Tensor`: a linear weight `[..., in, out]` stored as 4-bit NF4 codes, bit-exact with bitsandbytes.

Storage (chosen for the kernels, which contract `in` with `x` and keep `out` on the lanes):
- `codes` uint8 `[..., in/2, out]` (or the same bytes as bfloat16 `[..., in/4, out]`, rows `2i` and `2i+1` of the
  uint8 array in one element: `storage_dtype="bfloat16"`, as FSDP-QLoRA stores them; `packed()` views them back):
  `in` is cut into chunks of 256 rows (the last chunk may be shorter: any multiple of 64); byte `j` of a chunk of
  width `c` packs row `j` (high nibble) and row `j + c/2` (low nibble), so a kernel unpacks a chunk into two
  contiguous row ranges and multiplies them with two contiguous, lane-aligned slices of `x` (no interleaving,
  which TPU lanes cannot do cheaply).
- `absmax` `[..., in/64, out]`: fp32, or uint8 with double quantisation, then `nested_absmax` fp32
  `[..., ceil(in*out/64/256)]` and `offset` fp32 `[...]` as bitsandbytes computes them per tensor.
Blocks of 64 run along `in` for one output feature, exactly bitsandbytes' blocks of the flattened row-major
`weight[out, in]` when `in` is a multiple of 64 (required here), so the codes, absmax and every dequantised value
equal bitsandbytes' and `to_bnb` / `from_bnb` are exact permutations. Every array field carries the leading layer
axes, so `lax.scan` slices a stacked weight like any other leaf and no block crosses a layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.errors import UnsupportedConfigError
from jaxft.ops.linear import Weight
from jaxft.quant import bnb_format, fused
from jaxft.quant.bnb_format import BLOCK, NF4_CODES, BnbNF4
from jaxft.quant.kernels import dispatch
from jaxft.quant.layout import pack, unpack

def _check_in_features(k: int, where: str) -> None:
    if k % BLOCK:
        raise UnsupportedConfigError(
            f"{where}: NF4 needs the input features ({k}) to be a multiple of {BLOCK} (blocks of {BLOCK} run along "
            "the input axis); leave this weight unquantised")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class NF4Tensor(Weight):
    """An NF4-quantised linear weight; `shape` and `dtype` are the dense weight's (`[..., in, out]`, the dtype it
    dequantises to), never the packed bytes'. `x @ W` runs the fused dequantize-matmul kernel where the backend and
    shape allow it and the plain-XLA product otherwise (`jaxft.quant.kernels.dispatch`)."""

    codes: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    dtype_name: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        per_row = 2 * jnp.dtype(self.codes.dtype).itemsize  # codes per stored element along `in`
        return (*self.codes.shape[:-2], per_row * self.codes.shape[-2], self.codes.shape[-1])

    @property
    def storage_dtype(self) -> str:
        """`uint8` or `bfloat16`: the array type holding the packed codes."""
        return jnp.dtype(self.codes.dtype).name

    def packed(self) -> jax.Array:
        """The packed codes as uint8 `[..., in/2, out]` (a bitcast of bfloat16 storage; no copy of values)."""
        return unview_codes(self.codes)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype_name)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def _check_compute_storage(self, where: str) -> None:
        if self.codes.dtype != jnp.uint8:
            # Inside the layer scan XLA:CPU may canonicalise NaN bit patterns of sliced bfloat16 values.
            raise UnsupportedConfigError(
                f"NF4Tensor.{where}: codes stored as {self.codes.dtype} reach the product; pass the params through "
                "jaxft.quant.compute_view (peft.bind of LoRA/DoRA does) before the forward pass")

    def absmax_f32(self) -> jax.Array:
        """fp32 absmax `[..., in/64, out]` (decodes the double-quantised tables)."""
        if not self.double_quant:
            return self.absmax
        kb, n = self.absmax.shape[-2:]
        order = jnp.arange(n)[None, :] * kb + jnp.arange(kb)[:, None]  # bitsandbytes' flat index of block (kb, n)
        one = lambda a, nest, off: bnb_format.dequantize_absmax(a, nest, off, order)  # noqa: E731
        for _ in range(self.absmax.ndim - 2):
            one = jax.vmap(one)
        return one(self.absmax, self.nested_absmax, self.offset)

    def apply(self, x: jax.Array, bias: jax.Array | None) -> jax.Array:
        if len(self.shape) != 2:
            raise UnsupportedConfigError(f"NF4Tensor.apply: a stacked weight {self.shape} is applied one layer at a "
                                         "time (inside the layer scan)")
        self._check_compute_storage("apply")
        y = dispatch.matmul(x, self.packed(), self.absmax_f32())
        return y if bias is None else y + bias.astype(y.dtype)

    def apply_lora(self, x: jax.Array, xd: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
        """`x W + scale * (xd a) b` as one product with one backward pass (`jaxft.quant.fused.lora_linear`): how
        `jaxft.peft.Lora` computes LoRA over this base (QLoRA). `xd` is `x` after the adapter's dropout."""
        if len(self.shape) != 2:
            raise UnsupportedConfigError(f"NF4Tensor.apply_lora: a stacked weight {self.shape} is applied one layer "
                                         "at a time (inside the layer scan)")
        self._check_compute_storage("apply_lora")
        return fused.lora_linear(x, xd, self, a, b, scale)

    def materialize(self) -> jax.Array:
        return dequantize(self)


def view_codes(codes: jax.Array, storage_dtype: Any) -> jax.Array:
    """Packed uint8 codes `[..., in/2, out]` stored as `storage_dtype`: uint8 as they are, bfloat16 as
    `[..., in/4, out]` whose element `(i, j)` holds bytes `(2i, j)` and `(2i+1, j)` (a bitcast: exact)."""
    if jnp.dtype(storage_dtype) == jnp.uint8:
        return codes
    if jnp.dtype(storage_dtype) != jnp.bfloat16:
        raise UnsupportedConfigError(f"NF4 storage_dtype {jnp.dtype(storage_dtype).name}: only uint8 and bfloat16 "
                                     "are implemented")
    *lead, rows, n = codes.shape
    pairs = jnp.swapaxes(codes.reshape(*lead, rows // 2, 2, n), -1, -2)  # [..., rows/2, out, 2]
    return jax.lax.bitcast_convert_type(pairs, jnp.bfloat16)


def unview_codes(codes: jax.Array) -> jax.Array:
    """The inverse of `view_codes`: uint8 `[..., in/2, out]`."""
    if codes.dtype == jnp.uint8:
        return codes
    pairs = jax.lax.bitcast_convert_type(codes, jnp.uint8)  # [..., in/4, out, 2]
    *lead, rows, n, _ = pairs.shape
    return jnp.swapaxes(pairs, -1, -2).reshape(*lead, 2 * rows, n)


def with_storage(t: NF4Tensor, storage_dtype: Any) -> NF4Tensor:
    """`t` with its codes stored as `storage_dtype` (uint8 or bfloat16); values unchanged."""
    return dataclasses.replace(t, codes=view_codes(t.packed(), storage_dtype))


def quantize(w: jax.Array, *, double_quant: bool = True, offset: jax.Array | None = None,
             storage_dtype: Any = jnp.uint8) -> NF4Tensor:
    """NF4-quantise a dense `w[..., in, out]` (fp32, bf16 or fp16; `in` a multiple of 64), each `[in, out]` matrix
    on its own as bitsandbytes quantises `weight[out, in]` (leading axes are layers). `offset` (double
    quantisation, per matrix `[...]`) replaces the fp32 mean of the absmax. `storage_dtype`: the codes' array type
    (`view_codes`)."""
    return with_storage(_quantize(w, double_quant, offset), storage_dtype)


def _quantize(w, double_quant, offset) -> NF4Tensor:
    *lead, k, n = w.shape
    _check_in_features(k, "quantize")
    wf = w.astype(jnp.float32)
    blocks = wf.reshape(*lead, k // BLOCK, BLOCK, n)
    absmax = jnp.max(jnp.abs(blocks), axis=-2)  # [..., in/64, out]
    scaled = jnp.clip(blocks * bnb_format.safe_inverse(absmax)[..., None, :], -1, 1)
    codes = pack(bnb_format.nf4_codes(scaled).reshape(*lead, k, n))
    if not double_quant:
        return NF4Tensor(codes, absmax, None, None, jnp.dtype(w.dtype).name)

    def dq(a, off):  # one matrix: bitsandbytes' flat order is [out, in/64]
        q, nested, off = bnb_format.double_quantize(a.T.reshape(-1), off)
        return q.reshape(n, k // BLOCK).T, nested, off

    off = None if offset is None else jnp.asarray(offset, jnp.float32)
    fn = dq
    for _ in lead:
        fn = jax.vmap(fn)
    if off is None:
        fn_no = lambda a: dq(a, None)  # noqa: E731
        for _ in lead:
            fn_no = jax.vmap(fn_no)
        absmax_q, nested, off = fn_no(absmax)
    else:
        absmax_q, nested, off = fn(absmax, off)
    return NF4Tensor(codes, absmax_q, nested, off, jnp.dtype(w.dtype).name)


def dequantize(t: NF4Tensor, dtype: Any = None) -> jax.Array:
    """The dense `[..., in, out]` weight: `fp32(code * absmax)` rounded to `dtype` (default `t.dtype`), bit-exact
    with bitsandbytes' `dequantize_4bit`. Plain XLA (the oracle the kernels are tested against)."""
    vals = jnp.asarray(NF4_CODES)[unpack(t.packed())]
    absmax = jnp.repeat(t.absmax_f32(), BLOCK, axis=-2)
    return (vals * absmax).astype(t.dtype if dtype is None else dtype)


def to_bnb(t: NF4Tensor) -> BnbNF4:
    """bitsandbytes' layout of one `[in, out]` NF4Tensor: the tensor `quantize_4bit(weight[out, in])` returns."""
    if len(t.shape) != 2:
        raise UnsupportedConfigError(f"to_bnb: one matrix at a time, got a stacked NF4Tensor {t.shape}")
    k, n = t.shape
    q = unpack(t.packed()).T.reshape(-1)  # [out, in] row-major
    packed = ((q[0::2] << 4) | q[1::2]).astype(jnp.uint8)
    return BnbNF4(packed, t.absmax.T.reshape(-1), t.nested_absmax, t.offset, (n, k), t.dtype)


def from_bnb(q: BnbNF4) -> NF4Tensor:
    """An `[in, out]` NF4Tensor from bitsandbytes' NF4 of `weight[out, in]` (exact; no re-quantisation)."""
    if len(q.shape) != 2:
        raise UnsupportedConfigError(f"from_bnb: expected a 2-D weight[out, in], got shape {tuple(q.shape)}")
    n, k = q.shape
    _check_in_features(k, "from_bnb")
    codes = jnp.stack([q.packed >> 4, q.packed & 15], axis=-1).reshape(n, k).T.astype(jnp.int32)
    absmax = q.absmax.reshape(n, k // BLOCK).T
    return NF4Tensor(pack(codes), absmax, q.nested_absmax, q.offset, jnp.dtype(q.dtype).name)
