"""bitsandbytes' NF4 format in plain JAX: `quantize_4bit(..., quant_type="nf4", blocksize=64)` and `dequantize_4bit`
of bitsandbytes 0.50.2 (CPU), bit for bit, on bitsandbytes' own layout (any shape).

bitsandbytes flattens the row-major tensor (`weight[out, in]` for a linear layer) and cuts it into blocks of 64; a
last partial block is allowed. Each block keeps `absmax` (fp32) and every value becomes the NF4 code nearest to
`value * (1 / absmax)` (ties to the lower code; the partial block divides by its absmax instead, as bitsandbytes
does). Codes are packed two per byte, the even element in the high nibble; an odd count is padded with code 7 (0.0).
Double quantisation ("compress_statistics") subtracts `offset = mean(absmax)` and quantises the result in blocks of
256 to 8 bits with bitsandbytes' signed dynamic map, using its CPU kernel's rule (a 65,536-bin lookup table over
[-1, 1], not the nearest code; an all-zero block stores code 0).

Where bitsandbytes' own result depends on the machine, this module takes one answer and says so: `offset` is the
fp32 mean, which torch sums in an order that depends on the CPU's vector width and thread count (pass bitsandbytes'
offset to `double_quantize` to reproduce its tables exactly); a block whose largest magnitude is subnormal
(< 2**-126) quantises to zeros where XLA flushes denormals.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 64  # NF4 values per absmax
NESTED_BLOCK = 256  # absmax values per nested absmax (double quantisation)

NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)
# bitsandbytes' decision bounds: midpoints of neighbouring codes, computed in fp32 as it does.
NF4_BOUNDS = ((NF4_CODES[:-1] + NF4_CODES[1:]) / np.float32(2)).astype(np.float32)

# bitsandbytes.functional.create_dynamic_map() (signed, 8 bits), the 256 float32 values little-endian.
_DYNAMIC_MAP_HEX = (
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf000053bf66664fbf"
    "cdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf"
    "666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be"
    "0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be"
    "666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd"
    "2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bc"
    "cdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbbfca9f1ba9defa7ba"
    "ff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6"
    "b7a313b500000000b7a31335941a5a36ff0502370642b23734803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a"
    "806a3c3a3ee8593aff65773a9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d"
    "0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e"
    "9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e"
    "9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f"
    "3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f"
    "9a99443f3333483fcdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"
)
DYNAMIC_MAP = np.frombuffer(bytes.fromhex(_DYNAMIC_MAP_HEX), "<f4").astype(np.float32)


def _lut_index(v: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU `norm_to_lut_index`: `(uint16)((v + 1) * 0.5 * 65535 + 0.5)` in fp32, the last
    multiply-add fused (GCC contracts it under the `fma` target the kernel is built for)."""
    t = ((v.astype(np.float32) + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    return (t.astype(np.float64) * 65535.0 + 0.5).astype(np.float32).astype(np.int64)


def _dynamic_thresholds() -> np.ndarray:
    """`[255]` fp32: the 8-bit code bitsandbytes' CPU `quantize_blockwise` gives a normalised value `v` in [-1, 1] is
    `#{k: v >= thresholds[k]}`. Its kernel maps `v` to one of 65,536 bins and each bin to the code whose midpoints
    bracket the bin's centre; both steps are monotone, so the composite is a step function with at most 255 steps,
    found here by bisection over the ordered fp32 values of [-1, 1]."""
    code = DYNAMIC_MAP
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(65536, dtype=np.float32)
    centre = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(65535)).astype(np.float32)
    lut = np.searchsorted(mid, centre, side="left")  # bins' codes: count of midpoints below the centre
    first_bin = np.searchsorted(lut, np.arange(1, 256), side="left")  # smallest bin with code >= k
    # Smallest fp32 v in [-1, 1] with _lut_index(v) >= first_bin: bisection on the order-preserving int view.
    def to_ord(f):
        b = f.astype(np.float32).view(np.int32).astype(np.int64)
        return np.where(b < 0, -(b & 0x7FFFFFFF), b)

    def from_ord(o):
        b = np.where(o < 0, (-o) | -0x80000000, o).astype(np.int64)
        return b.astype(np.int32).view(np.float32)

    lo = np.full(255, to_ord(np.float32(-1.0)) - 1)  # _lut_index(from_ord(lo)) < target (or below range)
    hi = np.full(255, to_ord(np.float32(1.0)) + 1)
    for _ in range(40):
        m = (lo + hi) // 2
        ok = _lut_index(from_ord(m)) >= first_bin
        hi, lo = np.where(ok, m, hi), np.where(ok, lo, m)
    thresholds = from_ord(np.minimum(hi, to_ord(np.float32(1.0))))
    # a code no bin maps to (the dynamic map is finer than the bins near 0) gets no own step: it repeats the next
    return np.where(first_bin >= 65536, np.float32(np.inf), thresholds).astype(np.float32)


DYNAMIC_THRESHOLDS = _dynamic_thresholds()


class BnbNF4(NamedTuple):
    """NF4 weights in bitsandbytes' layout (what `quantize_4bit` returns and a checkpoint stores).

    packed: uint8 `[ceil(n / 2)]`, n = prod(shape); absmax: fp32 `[ceil(n / 64)]`, or uint8 with double
    quantisation; nested_absmax: fp32 `[ceil(len(absmax) / 256)]` or None; offset: fp32 `[]` or None;
    shape, dtype: the dense tensor's.
    """

    packed: jax.Array
    absmax: jax.Array
    nested_absmax: jax.Array | None
    offset: jax.Array | None
    shape: tuple[int, ...]
    dtype: jnp.dtype


def nf4_codes(values: jax.Array) -> jax.Array:
    """NF4 code (int32, 0..15) of normalised fp32 values: the number of bounds strictly below each value, as
    `torch.bucketize(..., right=False)` counts (a value on a bound takes the lower code)."""
    # searchsorted (count of bounds < v) rather than a [..., 15] comparison: no temporary 15x the input
    return jnp.searchsorted(jnp.asarray(NF4_BOUNDS), values, side="left").astype(jnp.int32)


def _blockwise_absmax(flat: jax.Array, block: int) -> tuple[jax.Array, jax.Array, int]:
    """`(full_blocks [b, block], tail [r], r)` of a flat fp32 array."""
    n = flat.shape[0]
    r = n % block
    return flat[: n - r].reshape(-1, block), flat[n - r:], r


def safe_inverse(absmax: jax.Array) -> jax.Array:
    """`1 / absmax`, 0 for an all-zero block (bitsandbytes clamps to 1e-38, whose inverse times 0 is 0 too; here the
    clamp would be a subnormal, which XLA:CPU flushes to 0)."""
    return jnp.where(absmax == 0, jnp.float32(0), jnp.float32(1) / jnp.where(absmax == 0, 1, absmax))


def quantize_bnb(w: jax.Array, *, double_quant: bool, offset: jax.Array | None = None) -> BnbNF4:
    """`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)`
    in bitsandbytes' layout, for any shape; `w` fp32, bf16 or fp16. `offset` (double quantisation only) replaces
    the fp32 mean of the absmax (bitsandbytes' own mean depends on the CPU it ran on)."""
    flat = jnp.ravel(w).astype(jnp.float32)
    full, tail, r = _blockwise_absmax(flat, BLOCK)
    absmax = jnp.max(jnp.abs(full), axis=1)
    scaled = jnp.clip(full * safe_inverse(absmax)[:, None], -1, 1).reshape(-1)
    if r:
        am = jnp.max(jnp.abs(tail))
        absmax = jnp.concatenate([absmax, am[None]])
        # bitsandbytes divides the partial block (the full ones multiply by the inverse): kept apart for bit-exactness
        scaled = jnp.concatenate([scaled, jnp.clip(tail / jnp.where(am == 0, 1, am), -1, 1)])
    q = nf4_codes(scaled)
    if q.shape[0] % 2:
        q = jnp.concatenate([q, jnp.full((1,), 7, q.dtype)])  # bitsandbytes pads with 0.0, code 7
    packed = ((q[0::2] << 4) | q[1::2]).astype(jnp.uint8)
    if not double_quant:
        return BnbNF4(packed, absmax, None, None, tuple(w.shape), jnp.dtype(w.dtype))
    absmax_q, nested, offset = double_quantize(absmax, offset)
    return BnbNF4(packed, absmax_q, nested, offset, tuple(w.shape), jnp.dtype(w.dtype))


def double_quantize(absmax: jax.Array, offset: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bitsandbytes' double quantisation of a flat fp32 `absmax[n]`: `(codes uint8 [n], nested fp32 [ceil(n/256)],
    offset fp32 [])`, `offset` defaulting to the fp32 mean. The codes follow bitsandbytes' CPU kernel (0.50.2):
    lookup-table rounding of `(absmax - offset) * (1 / nested)` to the signed dynamic map; all-zero block -> 0."""
    if offset is None:
        offset = jnp.mean(absmax.astype(jnp.float32))
    offset = jnp.asarray(offset, jnp.float32)
    d = absmax.astype(jnp.float32) - offset
    full, tail, r = _blockwise_absmax(d, NESTED_BLOCK)
    nested = jnp.max(jnp.abs(full), axis=1)
    inv = jnp.repeat(safe_inverse(nested), NESTED_BLOCK)
    if r:
        am = jnp.max(jnp.abs(tail))
        nested = jnp.concatenate([nested, am[None]])
        inv = jnp.concatenate([inv, jnp.broadcast_to(safe_inverse(am), (r,))])
    v = jnp.clip(d * inv, -1, 1)
    # count of thresholds <= v, without an [n, 255] temporary
    codes = jnp.searchsorted(jnp.asarray(DYNAMIC_THRESHOLDS), v, side="right").astype(jnp.int32)
    codes = jnp.where(jnp.repeat(nested == 0, NESTED_BLOCK)[: d.shape[0]], 0, codes)
    return codes.astype(jnp.uint8), nested, offset


def dequantize_absmax(absmax_q: jax.Array, nested: jax.Array, offset: jax.Array, order: jax.Array | None = None
                      ) -> jax.Array:
    """fp32 absmax from double quantisation: `fp32(dynamic_map[q] * nested[i // 256]) + offset`, with `i` the
    position in bitsandbytes' flat order (`order`, same shape as `absmax_q`, when the codes are stored permuted)."""
    i = jnp.arange(absmax_q.size).reshape(absmax_q.shape) if order is None else order
    return jnp.asarray(DYNAMIC_MAP)[absmax_q.astype(jnp.int32)] * nested[i // NESTED_BLOCK] + offset


def dequantize_bnb(q: BnbNF4) -> jax.Array:
    """`bitsandbytes.functional.dequantize_4bit` of `q`: `fp32(code * absmax)` rounded to `q.dtype`, shape
    `q.shape`."""
    n = int(np.prod(q.shape))
    absmax = q.absmax if q.nested_absmax is None else dequantize_absmax(q.absmax, q.nested_absmax, q.offset)
    codes = jnp.stack([q.packed >> 4, q.packed & 15], axis=-1).reshape(-1)[:n].astype(jnp.int32)
    vals = jnp.asarray(NF4_CODES)[codes] * jnp.repeat(absmax.astype(jnp.float32), BLOCK)[:n]
    return vals.astype(q.dtype).reshape(q.shape)
