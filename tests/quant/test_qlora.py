"""QLoRA's product: LoRA/DoRA over an `NF4Tensor` base against the same adapter over the dequantised dense weight
(jaxft's LoRA path, itself checked against peft in tests/peft), in float32; what the backward pass keeps; merge,
unmerge and the trainable-tree guard; bfloat16 code storage."""

from __future__ import annotations

import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from jaxft import peft, quant
from jaxft.errors import UnsupportedConfigError
from jaxft.models.config import LlamaConfig
from jaxft.models.params import init_params
from jaxft.peft.types import Dora, Lora
from jaxft.quant import NF4Tensor

# Largest relative error (max |diff| / max |ref|) measured over the cases below (3 shapes x 2 seeds x dropout on/off,
# output and the gradients of x, a, b, scale): 2.4e-7 on jax 0.10.2; bound 1e-6 (4x).
PRODUCT_RTOL = 1e-6
# Tiny Llama, loss and adapter gradients over NF4 vs the dequantised base: 1.4e-6 (LoRA), 7.0e-7 (DoRA) measured;
# bound 5e-6 (3.5x).
MODEL_RTOL = 5e-6


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _dense(t: NF4Tensor) -> jax.Array:
    return quant.dequantize(t)


@pytest.mark.parametrize("k,n,lead", [(64, 5, (7,)), (256, 96, (2, 3)), (320, 48, (4,))])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_over_nf4_matches_lora_over_the_dequantised_weight(k, n, lead, seed, dropout):
    ks = jax.random.split(jax.random.key(seed), 6)
    t = quant.quantize(jax.random.normal(ks[0], (k, n)) * 0.05, double_quant=seed == 0)
    x = jax.random.normal(ks[1], (*lead, k))
    a, b = jax.random.normal(ks[2], (k, 8)) * 0.1, jax.random.normal(ks[3], (8, n)) * 0.1
    scale = jnp.float32(1.5)
    key = ks[4] if dropout else None
    cot = jax.random.normal(ks[5], (*lead, n))

    def f(base, x, a, b, scale):
        return jnp.sum(Lora(base, a, b, scale, key, dropout).apply(x, None) * cot)

    vg = jax.jit(jax.value_and_grad(f, argnums=(1, 2, 3, 4)))
    got, g_got = vg(t, x, a, b, scale)
    want, g_want = vg(_dense(t), x, a, b, scale)
    assert _rel(got, want) < PRODUCT_RTOL
    for name, g, w in zip("x a b scale".split(), g_got, g_want):
        assert _rel(g, w) < PRODUCT_RTOL, name


def _saved(fn, *args, capsys) -> list[str]:
    ad_checkpoint.print_saved_residuals(fn, *args)
    return capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_backward_keeps_the_packed_weight_never_a_dense_copy(kind, capsys):
    """A scan over 3 NF4 layers (256 x 256) with LoRA or DoRA: the saved residuals hold the packed codes and the
    stored absmax tables, the layer input once per layer, never a float [in, out] weight nor the fp32 absmax."""
    ks = jax.random.split(jax.random.key(0), 4)
    t = quant.quantize(jax.random.normal(ks[0], (3, 256, 256)) * 0.05)
    a, b = jax.random.normal(ks[1], (3, 256, 8)) * 0.1, jax.random.normal(ks[2], (3, 8, 256)) * 0.1
    x, mag = jax.random.normal(ks[3], (2, 16, 256)), jnp.ones((3, 256))

    def loss_over(base):
        def loss(a, b, mag, x):
            def body(h, layer):
                w, a_, b_, m_ = layer
                leaf = Lora(w, a_, b_, jnp.float32(2.0)) if kind == "lora" else Dora(
                    w, a_, b_, m_, jnp.float32(2.0), jnp.bool_(True))
                return jnp.tanh(leaf.apply(h, None)), None
            return jnp.sum(jax.lax.scan(body, x, (base, a, b, mag))[0])
        return loss

    lines = _saved(loss_over(t), a, b, mag, x, capsys=capsys)
    dense_lines = _saved(loss_over(quant.dequantize(t)), a, b, mag, x, capsys=capsys)
    text = "\n".join(lines)
    shapes = [ln.split(" ")[0] for ln in lines]
    assert "u8[3,128,256]" in shapes and "u8[3,4,256]" in shapes, text  # packed codes, 8-bit absmax
    assert not {"f32[3,256,256]", "f32[256,256]", "bf16[3,256,256]"} & set(shapes), text  # no dense weight
    assert "f32[3,4,256]" not in shapes, text  # nor the decoded fp32 absmax
    # activations [L, 2, 16, 256] (the layer input, tanh's output, ...): as many as LoRA over a dense base keeps
    acts = "f32[3,2,16,256]"
    assert shapes.count(acts) == [ln.split(" ")[0] for ln in dense_lines].count(acts), text


@pytest.mark.slow  # ~40 s: two methods x two bases of a compiled model gradient
def test_tiny_model_lora_and_dora_over_nf4():
    """A tiny untied Llama: loss and adapter gradients with the base in NF4 vs dequantised (rsLoRA all-linear, DoRA
    on three modules); merge dequantises; unmerge refuses NF4 by name."""
    c = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    ids = jnp.arange(32).reshape(2, 16) % 256
    q = quant.quantize_params(init_params(c, jax.random.key(0)), quant.QuantPlan())
    deq = jax.tree.map(lambda v: quant.dequantize(v) if isinstance(v, NF4Tensor) else v, q,
                       is_leaf=lambda v: isinstance(v, NF4Tensor))
    for spec in (peft.LoraSpec(r=4, alpha=8, target_modules="all-linear", use_rslora=True),
                 peft.DoraSpec(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))):
        ad = peft.init(spec, c, q, jax.random.key(1))
        ad = jax.tree.map(lambda v: v + 0.01 * jax.random.normal(jax.random.key(2), v.shape), ad)

        @jax.jit
        def loss_grad(ad, base):
            return jax.value_and_grad(lambda ad: jnp.mean(jaxft.forward(c, peft.bind(base, spec, ad), ids) ** 2))(ad)

        l1, g1 = loss_grad(ad, q)
        l2, g2 = loss_grad(ad, deq)
        assert _rel(l1, l2) < MODEL_RTOL
        for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
            assert _rel(u, v) < MODEL_RTOL
        merged = peft.merge(q, spec, ad)
        assert not quant.nf4_leaves(merged)
        for u, v in zip(jax.tree.leaves(merged), jax.tree.leaves(peft.merge(deq, spec, ad))):
            np.testing.assert_array_equal(u, v)  # merge dequantises, then folds exactly as on the dense base
        with pytest.raises(UnsupportedConfigError, match=r"unmerge: (lm_head|model\.layers\..*)\.kernel is an NF4"):
            peft.unmerge(q, spec, ad)


def test_quantised_base_refused_as_trainable():
    t = quant.quantize(jnp.ones((64, 8)))
    with pytest.raises(UnsupportedConfigError, match=r"optimizer: lm_head\.kernel is an NF4-quantised base weight"):
        quant.refuse_trainable({"lm_head": {"kernel": t}, "x": jnp.ones(3)})
    quant.refuse_trainable({"lm_head": {"kernel": quant.dequantize(t)}})


def test_bfloat16_storage_is_the_same_bytes():
    w = jax.random.normal(jax.random.key(0), (3, 320, 24))
    t8, t16 = quant.quantize(w), quant.quantize(w, storage_dtype=jnp.bfloat16)
    assert t16.codes.dtype == jnp.bfloat16 and t16.codes.shape == (3, 80, 24) and t16.shape == t8.shape
    np.testing.assert_array_equal(t16.packed(), t8.codes)
    np.testing.assert_array_equal(quant.dequantize(t16), quant.dequantize(t8))
    # sliced inside a loop, bf16 NaN patterns are canonicalised on XLA:CPU: the product refuses bf16 codes, bind
    # views them as uint8 first
    with pytest.raises(UnsupportedConfigError, match="compute_view"):
        jax.tree.map(lambda v: v[0], t16).apply(jnp.ones((2, 320)), None)
    y16 = quant.compute_view(jax.tree.map(lambda v: v[0], t16)).apply(jnp.ones((2, 320)), None)
    np.testing.assert_array_equal(y16, jax.tree.map(lambda v: v[0], t8).apply(jnp.ones((2, 320)), None))
