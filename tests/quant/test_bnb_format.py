"""bitsandbytes' NF4 format in plain JAX against bitsandbytes 0.50.2 itself (CPU): the same packed codes, the same
absmax (fp32, or the double-quantised uint8 codes with their nested absmax), the same dequantised values, bit for
bit, on many shapes (partial last blocks, odd element counts, all-zero blocks) and seeds, from fp32, bf16 and fp16.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.quant import bnb_format as bf
from optional_import import optional

torch = optional("torch")
bnbf = optional("bitsandbytes.functional")

SHAPES = [(7,), (130,), (3, 5), (17, 33), (96, 576), (5, 1000), (300, 77), (2, 3, 129)]
DTYPES = {"float32": ("float32", jnp.float32), "bfloat16": ("bfloat16", jnp.bfloat16), "float16": ("float16", jnp.float16)}


def _weights(shape, seed, dtype_name):
    """Normal weights with a per-row scale, an all-zero stretch, and exact code-boundary values."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 2.0, size=shape[:-1] + (1,)).astype(np.float32)
    flat = w.reshape(-1)
    if flat.size >= 200:
        flat[64:128] = 0.0  # an all-zero block (the second one) when the tensor has one
        flat[130:140] = bf.NF4_BOUNDS[:10] * np.float32(3.0)  # values on decision bounds after scaling
        flat[140] = 3.0  # ... with absmax 3
    t = torch.from_numpy(w.copy()).to(getattr(torch, dtype_name))
    return t, jnp.asarray(w).astype(DTYPES[dtype_name][1]) if dtype_name == "float32" else jnp.asarray(
        t.float().numpy()).astype(DTYPES[dtype_name][1])


def _np(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_dequantize_match_bitsandbytes(shape, dtype_name):
    for seed in range(2):
        t, w = _weights(shape, seed, dtype_name)
        packed, state = bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=False)
        q = bf.quantize_bnb(w, double_quant=False)
        np.testing.assert_array_equal(np.asarray(q.packed), _np(packed).reshape(-1))
        np.testing.assert_array_equal(np.asarray(q.absmax), _np(state.absmax))
        want = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        got = bf.dequantize_bnb(q)
        assert got.shape == shape and got.dtype == w.dtype  # (bitsandbytes' CPU kernel gives 1-D shapes as [1, n])
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), _np(want.float()).reshape(shape))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("shape", [(64,), (130,), (96, 576), (300, 77), (33, 64 * 260), (40, 4096)], ids=str)
def test_double_quantization_matches_bitsandbytes(shape, dtype_name):
    """Given bitsandbytes' offset (torch's fp32 mean depends on the CPU), codes, uint8 absmax, nested absmax and the
    dequantised values are bitsandbytes' bit for bit; our own offset is within 4 fp32 ulps of it."""
    for seed in range(2):
        t, w = _weights(shape, seed, dtype_name)
        packed, state = bnbf.quantize_4bit(t, blocksize=64, quant_type="nf4", compress_statistics=True)
        offset = np.float32(_np(state.offset))
        q = bf.quantize_bnb(w, double_quant=True, offset=offset)
        np.testing.assert_array_equal(np.asarray(q.packed), _np(packed).reshape(-1))
        np.testing.assert_array_equal(np.asarray(q.absmax), _np(state.absmax))
        np.testing.assert_array_equal(np.asarray(q.nested_absmax), _np(state.state2.absmax))
        want = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
        np.testing.assert_array_equal(np.asarray(bf.dequantize_bnb(q).astype(jnp.float32)),
                                      _np(want.float()).reshape(shape))
        own = np.float32(bf.quantize_bnb(w, double_quant=True).offset)
        assert abs(own - offset) <= 4 * np.spacing(offset), (own, offset)


def test_dynamic_map_and_thresholds_match_bitsandbytes():
    """The hard-coded dynamic map is bitsandbytes'; the step thresholds reproduce its CPU `quantize_blockwise` on
    values spread over [-1, 1] and on every threshold and its fp32 neighbours."""
    np.testing.assert_array_equal(bf.DYNAMIC_MAP, _np(bnbf.create_dynamic_map()))
    th = bf.DYNAMIC_THRESHOLDS[np.isfinite(bf.DYNAMIC_THRESHOLDS)]
    probes = np.concatenate([th, np.nextafter(th, -2), np.nextafter(th, 2), np.linspace(-1, 1, 20001)])
    probes = np.clip(probes.astype(np.float32), -1, 1)
    x = np.concatenate([probes, np.float32([1.0])])  # absmax 1: the map sees the probes unscaled
    x = np.pad(x, (0, -x.size % 256), constant_values=1.0)
    q, state = bnbf.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    codes, nested, _ = bf.double_quantize(jnp.asarray(x), offset=0.0)
    np.testing.assert_array_equal(np.asarray(nested), _np(state.absmax))
    np.testing.assert_array_equal(np.asarray(codes), _np(q))


def test_pure_jax_without_torch_is_deterministic_and_sane():
    """Runs on the torch-free leg: codes decode to within half a code gap of the input, zero blocks stay zero."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((37, 100)), jnp.float32).at[0, :64].set(0.0)
    q = bf.quantize_bnb(w, double_quant=False)
    back = bf.dequantize_bnb(q)
    assert back.shape == w.shape and float(jnp.max(jnp.abs(back[0, :64]))) == 0.0
    gap = np.max(np.diff(bf.NF4_CODES)) / 2
    absmax = np.repeat(np.asarray(q.absmax), 64)[: w.size].reshape(w.shape)
    assert np.all(np.abs(np.asarray(back - w)) <= gap * absmax + 1e-6)
