"""`NF4Tensor` (jaxft's `[in, out]` layout) against bitsandbytes 0.50.2 on `weight[out, in]`: the same codes and
absmax up to the layout permutation (checked through `to_bnb`, exact), the same dequantised values, import
(`from_bnb`) without re-quantising; stacked layers quantise per layer; `shape`/`dtype` are the dense ones; the
custom VJP gives the input gradient of the dense product and no weight gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxft.errors import UnsupportedConfigError
from jaxft.ops.linear import linear
from jaxft.quant import NF4Tensor, dequantize, from_bnb, quantize, to_bnb
from jaxft.quant.kernels import dispatch
from optional_import import optional

torch = optional("torch")
bnbf = optional("bitsandbytes.functional")


def _np(t):
    return t.detach().cpu().numpy()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("k,n,dtype", [(64, 5, "float32"), (576, 192, "bfloat16"), (320, 48, "float16"),
                                        (1024, 64, "float32")])
def test_nf4tensor_matches_bitsandbytes(k, n, dtype, double_quant):
    for seed in range(2):
        w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.1
        w[0, :64] = 0.0  # an all-zero block
        t_w = torch.from_numpy(w).to(getattr(torch, dtype))
        packed, state = bnbf.quantize_4bit(t_w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        kernel = jnp.asarray(t_w.float().numpy().T).astype(dtype)  # jaxft's [in, out]
        offset = np.float32(_np(state.offset)) if double_quant else None
        t = quantize(kernel, double_quant=double_quant, offset=offset)
        assert t.shape == (k, n) and t.dtype == jnp.dtype(dtype)
        b = to_bnb(t)
        np.testing.assert_array_equal(np.asarray(b.packed), _np(packed).reshape(-1))
        np.testing.assert_array_equal(np.asarray(b.absmax), _np(state.absmax))
        if double_quant:
            np.testing.assert_array_equal(np.asarray(b.nested_absmax), _np(state.state2.absmax))
        want = _np(bnbf.dequantize_4bit(packed, state, quant_type="nf4").float()).T
        np.testing.assert_array_equal(np.asarray(dequantize(t).astype(jnp.float32)), want)
        back = from_bnb(b)
        for f in ("codes", "absmax"):
            np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(t, f)))


def test_stacked_layers_quantise_per_layer_and_scan_slices_them():
    w = jax.random.normal(jax.random.PRNGKey(0), (3, 256, 128), jnp.float32)
    w = w * jnp.array([1.0, 10.0, 0.01])[:, None, None]  # per-layer scales: a block crossing layers would show
    t = quantize(w, double_quant=True)
    assert t.shape == (3, 256, 128) and t.codes.shape == (3, 128, 128) and t.offset.shape == (3,)
    for i in range(3):
        one = quantize(w[i], double_quant=True)
        np.testing.assert_array_equal(np.asarray(dequantize(t)[i]), np.asarray(dequantize(one)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 256), jnp.float32)

    def step(c, layer):
        return c, linear(x, layer)

    _, ys = jax.lax.scan(step, 0, t)
    want = jnp.einsum("mk,lkn->lmn", x, dequantize(t))
    assert float(jnp.max(jnp.abs(ys - want))) <= 1e-4 * float(jnp.max(jnp.abs(want)))


def test_gradient_reaches_the_input_only():
    """d/dx of `linear(x, nf4)` equals the dense product's; the weight's absmax gets zeros (a frozen base)."""
    t = quantize(jax.random.normal(jax.random.PRNGKey(0), (512, 128), jnp.float32), double_quant=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 512), jnp.float32)
    w = dequantize(t)
    gx = jax.grad(lambda x_: jnp.sum(jnp.sin(linear(x_, t))))(x)
    want = jax.grad(lambda x_: jnp.sum(jnp.sin(x_ @ w)))(x)
    assert float(jnp.max(jnp.abs(gx - want))) <= 1e-5 * float(jnp.max(jnp.abs(want)))
    g_t = jax.grad(lambda t_: jnp.sum(linear(x, t_)), allow_int=True)(t)
    assert float(jnp.max(jnp.abs(g_t.absmax))) == 0.0


def test_in_features_not_multiple_of_64_refused():
    with pytest.raises(UnsupportedConfigError, match="multiple of 64"):
        quantize(jnp.ones((100, 8)))
    assert isinstance(quantize(jnp.ones((64, 8))), NF4Tensor)
    assert dispatch.platform() == "cpu"
