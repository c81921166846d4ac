"""Adapter trees: structure, init distributions (against torch's initialisers), untransformed layers, dropout
(against peft's training path), and the errors of bad targets and shapes."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxft
from hf_models import rel_err
from jaxft import peft as jpeft
from jaxft.schema import ConfigError

from tiny_tree import CONFIG, IDS, LINEAR, PARAMS, make_loss as _loss, noisy as _noisy  # noqa: F401


UNROLLED = jaxft.ModelOptions(scan_layers=False)  # for eager calls: an eager scan recompiles on every call


def test_lora_tree_mirrors_the_base_only_where_targets_matched():
    spec = jpeft.LoraSpec(r=4, target_modules="all-linear")
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0))
    assert set(adapter) == {"model"} and set(adapter["model"]) == {"layers"}  # no lm_head, no embeddings
    layers = adapter["model"]["layers"]
    assert {g: tuple(sorted(layers[g])) for g in layers} == {g: tuple(sorted(m)) for g, m in LINEAR.items()}
    for g, mods in LINEAR.items():
        for m in mods:
            k = PARAMS["model"]["layers"][g][m]["kernel"]
            node = layers[g][m]["kernel"]
            assert node["lora_a"].shape == (3, k.shape[1], 4) and node["lora_b"].shape == (3, 4, k.shape[2])
            assert not np.any(np.asarray(node["lora_b"]))
    ia3 = jpeft.init(jpeft.IA3Spec(), CONFIG, PARAMS, jax.random.key(0))
    assert ia3["model"]["layers"]["mlp"]["down_proj"]["kernel"]["ia3_l"].shape == (3, 48)  # input side
    assert ia3["model"]["layers"]["self_attn"]["k_proj"]["kernel"]["ia3_l"].shape == (3, 16)  # output side
    assert set(ia3["model"]["layers"]["self_attn"]) == {"k_proj", "v_proj"}


def test_init_distributions_match_torch():
    torch = pytest.importorskip("torch", reason="torch's initialisers are the reference")
    spec = jpeft.LoraSpec(r=16, target_modules=("down_proj",))
    a = np.asarray(jpeft.init(spec, CONFIG, PARAMS, jax.random.key(5))["model"]["layers"]["mlp"]["down_proj"]
                   ["kernel"]["lora_a"])
    ref = torch.empty(16 * 3, 48)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))  # peft's default for lora_A[r, in]
    bound = float(ref.abs().max())
    assert np.abs(a).max() <= bound * 1.02 and np.abs(a).max() >= bound * 0.95
    assert abs(a.std() / float(ref.std()) - 1) < 0.05
    g = jpeft.init(jpeft.LoraSpec(r=16, target_modules=("down_proj",), init="gaussian"), CONFIG, PARAMS,
                   jax.random.key(5))["model"]["layers"]["mlp"]["down_proj"]["kernel"]["lora_a"]
    assert abs(float(jnp.std(g)) * 16 - 1) < 0.05  # peft: normal(std = 1 / r)
    dora = jpeft.init(jpeft.DoraSpec(r=4, target_modules=("q_proj",)), CONFIG, PARAMS, jax.random.key(0))
    w = np.asarray(PARAMS["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_allclose(dora["model"]["layers"]["self_attn"]["q_proj"]["kernel"]["magnitude"],
                               np.linalg.norm(w, axis=1), rtol=1e-6)  # measured 1.75e-7, init seeds 0-4 (5.7x)


def test_untransformed_dora_layer_is_the_base_layer():
    spec = jpeft.DoraSpec(r=4, target_modules=("q_proj",), layers_to_transform=(1,))
    adapter = _noisy(jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0)))
    w = jpeft.bind(PARAMS, spec, adapter)["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    dense = np.asarray(w.materialize())
    base = np.asarray(PARAMS["model"]["layers"]["self_attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(dense[[0, 2]], base[[0, 2]])
    assert rel_err(dense[1], base[1]) > 1e-3


def _one_layer_peft(use_dora, p, seed=0):
    torch = pytest.importorskip("torch", reason="peft's training path is the reference")
    peft = pytest.importorskip("peft", reason="peft's training path is the reference")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 10, bias=True)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(seed)
    net = peft.get_peft_model(Net(), peft.LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], lora_dropout=p,
                                                     use_dora=use_dora))
    with torch.no_grad():
        for name, prm in net.named_parameters():
            if prm.requires_grad:
                prm.add_(0.3 * torch.randn_like(prm))
    return torch, net


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_dropout_matches_peft(use_dora):
    """peft in train mode with its dropout replaced by a fixed mask (the one jaxft draws from the same key)
    gives jaxft's training output: LoRA drops the adapter input only; DoRA also rescales the dropped base path."""
    p = 0.4
    torch, net = _one_layer_peft(use_dora, p)
    layer = net.base_model.model.proj
    x = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    key = jax.random.key(7)
    keep = np.asarray(jax.random.bernoulli(key, 1 - p, x.shape))
    layer.lora_dropout["default"] = _FixedDropout(torch, keep, p)
    net.train()
    with torch.no_grad():
        want = net(torch.as_tensor(x)).numpy()
    w, bias = layer.base_layer.weight.detach().numpy().T, layer.base_layer.bias.detach().numpy()
    a, b = layer.lora_A["default"].weight.detach().numpy().T, layer.lora_B["default"].weight.detach().numpy().T
    scale = jnp.asarray(layer.scaling["default"], jnp.float32)
    if use_dora:
        mag = layer.lora_magnitude_vector["default"].weight.detach().numpy()
        leaf = jpeft.Dora(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), jnp.asarray(mag), scale,
                          jnp.asarray(True), key, p)
    else:
        leaf = jpeft.Lora(jnp.asarray(w), jnp.asarray(a), jnp.asarray(b), scale, key, p)
    got = np.asarray(jaxft.linear(jnp.asarray(x), leaf, jnp.asarray(bias)))
    assert rel_err(got, want) <= 1e-5
    no_dropout = dataclasses.replace(leaf, dropout_key=None)
    eval_out = np.asarray(jaxft.linear(jnp.asarray(x), no_dropout, jnp.asarray(bias)))
    assert rel_err(got, eval_out) > 1e-3  # the training path really dropped something


class _FixedDropout:
    def __new__(cls, torch, keep, p):
        class Fixed(torch.nn.Module):
            def forward(self, x):
                return x * torch.tensor(keep, dtype=x.dtype) / (1 - p)

        return Fixed()


def test_bind_train_dropout_needs_a_key_and_changes_only_training():
    spec = jpeft.LoraSpec(r=4, target_modules=("q_proj", "v_proj"), dropout=0.3)
    adapter = _noisy(jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0)))
    with pytest.raises(ValueError, match="rng"):
        jpeft.bind(PARAMS, spec, adapter, train=True)
    eval_loss = float(_loss(spec, options=UNROLLED)(adapter))
    l1 = float(_loss(spec, options=UNROLLED, train=True, rng=jax.random.key(1))(adapter))
    l2 = float(_loss(spec, options=UNROLLED, train=True, rng=jax.random.key(2))(adapter))
    assert l1 != eval_loss and l1 != l2
    assert float(_loss(spec, options=UNROLLED, train=False, rng=jax.random.key(1))(adapter)) == eval_loss


def test_bad_targets_and_shapes_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"'qproj' matches no module; the modules are: .*self_attn\.q_proj"):
        jpeft.init(jpeft.LoraSpec(target_modules=("qproj",)), CONFIG, PARAMS, jax.random.key(0))
    with pytest.raises(ConfigError, match="embed_tokens.*modules_to_save"):
        jpeft.init(jpeft.LoraSpec(target_modules=("embed_tokens",)), CONFIG, PARAMS, jax.random.key(0))
    with pytest.raises(ConfigError, match="layer 5 is out of range"):
        jpeft.init(jpeft.LoraSpec(layers_to_transform=(5,)), CONFIG, PARAMS, jax.random.key(0))
    with pytest.raises(ConfigError, match="regex"):
        jpeft.LoraSpec(target_modules="q_proj|v_proj", layers_to_transform=(0,))
    tied = CONFIG.replace(tie_word_embeddings=True)
    tied_params = jaxft.init_params(tied, jax.random.key(0))
    with pytest.raises(ConfigError, match="tied"):
        jpeft.init(jpeft.LoraSpec(modules_to_save=("lm_head",)), tied, tied_params, jax.random.key(0))
    spec = jpeft.LoraSpec(r=4)
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0))
    adapter["model"]["layers"]["self_attn"]["q_proj"]["kernel"]["lora_a"] = jnp.zeros((3, 31, 4))
    with pytest.raises(ValueError, match=r"self_attn\.q_proj\.kernel\.lora_a has shape \(3, 31, 4\).*\(3, 32, 4\)"):
        jpeft.bind(PARAMS, spec, adapter)
