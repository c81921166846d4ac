"""Houlsby bottleneck adapters and BitFit through the same spec / init / bind interface.

No maintained library implements Houlsby adapters for current transformers: they are tested by identity at
initialisation, `jax.test_util.check_grads` against finite differences, and a short training run whose loss falls.
BitFit is tested against transformers with only the biases trainable: same gradients (relative 1e-5, 2e-6 measured),
same AdamW update (relative 3e-5, 8e-6 measured), fp32."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxft
from hf_models import rel_err
from jaxft import peft as jpeft
from jaxft.schema import ConfigError
from peft_ref import IDS, UNROLLED, jax_logits, tiny_pair

CONFIG = jaxft.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2)
PARAMS = jaxft.init_params(CONFIG, jax.random.key(0))


def _ce(config, params, ids, options=jaxft.ModelOptions()):
    logits = jaxft.forward(config, params, ids[:, :-1], options=options)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def test_houlsby_is_the_identity_at_init_and_sits_after_attention_and_mlp():
    spec = jpeft.HoulsbySpec(bottleneck=6, activation="gelu")
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(1))
    layers = adapter["model"]["layers"]
    assert set(layers) == {"self_attn", "mlp"}
    assert set(layers["self_attn"]) == {"o_proj"} and set(layers["mlp"]) == {"down_proj"}
    node = layers["mlp"]["down_proj"]["kernel"]
    assert node["down"].shape == (2, 32, 6) and node["up"].shape == (2, 6, 32) and not np.any(node["up"])
    assert np.any(node["down"])
    ids = jnp.asarray(IDS % CONFIG.vocab_size, jnp.int32)
    np.testing.assert_array_equal(jaxft.forward(CONFIG, jpeft.bind(PARAMS, spec, adapter), ids, options=UNROLLED),
                                  jaxft.forward(CONFIG, PARAMS, ids, options=UNROLLED))
    with pytest.raises(ValueError, match="not linear maps and cannot be merged"):
        jpeft.merge(PARAMS, spec, adapter)


# Second-order finite differences in float64 (inside `jax.enable_x64`, these tests only): the smallest atol = rtol at
# which `check_grads(order=2)` passes was 9.5e-7 over three seeds here (gelu; silu 1.1e-6, tanh 6.2e-6), so 1e-5 keeps
# a 10x margin. A derivative 1% off (checked below) needs 3.3e-3 or more. In float32 the same check needed 2.8e-2 on
# an AVX-512 AMD CPU: rounding, not the adapter.
FD_TOL = 1e-5


@jax.custom_jvp
def _one_percent_off(v):
    """The identity, with a derivative 1% too large: an injected gradient bug the check must catch."""
    return v


_one_percent_off.defjvp(lambda primals, tangents: (primals[0], 1.01 * tangents[0]))


@pytest.mark.parametrize("activation", ["gelu"])
def test_houlsby_gradients_match_finite_differences(activation):
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(2), 6)
        f64 = jnp.float64
        x = jax.random.normal(k[0], (3, 5, 8), f64)
        w, bias = jax.random.normal(k[1], (8, 10), f64) * 0.5, jax.random.normal(k[2], (10,), f64) * 0.1
        down, up = jax.random.normal(k[3], (10, 4), f64) * 0.5, jax.random.normal(k[4], (4, 10), f64) * 0.5
        db, ub = jax.random.normal(k[5], (4,), f64) * 0.1, jnp.full((10,), 0.05, f64)

        def f(x, w, down, db, up, ub, bug=False):
            down = _one_percent_off(down) if bug else down
            return jnp.sum(jnp.sin(jaxft.linear(x, jpeft.Houlsby(w, down, db, up, ub, activation), bias)))

        args = (x, w, down, db, up, ub)
        assert f(*args).dtype == f64
        check_grads(f, args, order=2, modes=("rev", "fwd"), atol=FD_TOL, rtol=FD_TOL)
        with pytest.raises(AssertionError):
            check_grads(functools.partial(f, bug=True), args, order=2, modes=("rev", "fwd"), atol=FD_TOL,
                        rtol=FD_TOL)


def test_houlsby_training_lowers_the_loss_and_round_trips(tmp_path):
    spec = jpeft.HoulsbySpec(bottleneck=8, activation="relu", init_std=0.05)
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(1))
    ids = jax.random.randint(jax.random.key(3), (4, 12), 0, CONFIG.vocab_size)
    opt = optax.adam(3e-2)
    state = opt.init(adapter)

    @jax.jit
    def step(adapter, state):
        loss, grads = jax.value_and_grad(lambda a: _ce(CONFIG, jpeft.bind(PARAMS, spec, a), ids))(adapter)
        updates, state = opt.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    losses = []
    for _ in range(25):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    with pytest.warns(UserWarning, match="Houlsby"):
        jpeft.save_adapter(spec, adapter, str(tmp_path / "h"), CONFIG)
    spec2, adapter2 = jpeft.load_adapter(str(tmp_path / "h"), CONFIG)
    assert spec2 == spec
    assert jax.tree.structure(adapter2) == jax.tree.structure(adapter)
    for a, b in zip(jax.tree.leaves(adapter2), jax.tree.leaves(adapter)):
        np.testing.assert_array_equal(a, b)


def test_bitfit_matches_transformers_with_only_biases_trainable(tmp_path):
    torch = pytest.importorskip("torch", reason="transformers in torch is the reference")
    model, config, params = tiny_pair("qwen2", tmp_path)
    spec = jpeft.BitFitSpec()
    adapter = jpeft.init(spec, config, params, jax.random.key(0))
    assert {m for m in adapter["model"]["layers"]["self_attn"]} == {"q_proj", "k_proj", "v_proj"}
    assert set(adapter["model"]["layers"]) == {"self_attn"}
    # transformers: freeze everything but the biases
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    for n, p in model.named_parameters():
        p.requires_grad_(n in biases)
    ids = torch.as_tensor(IDS)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    lr, wd = 1e-2, 0.1
    torch.optim.AdamW(list(biases.values()), lr=lr, weight_decay=wd, eps=1e-8).step()

    ids_j = jnp.asarray(IDS, jnp.int32)
    loss_j, grads = jax.jit(jax.value_and_grad(lambda a: _ce(config, jpeft.bind(params, spec, a), ids_j)))(adapter)
    assert rel_err(loss_j, loss.item()) <= 1e-5
    opt = optax.adamw(lr, weight_decay=wd, eps=1e-8)
    updates, _ = opt.update(grads, opt.init(adapter), adapter)
    new = optax.apply_updates(adapter, updates)
    for proj in ("q_proj", "k_proj", "v_proj"):
        g = np.asarray(grads["model"]["layers"]["self_attn"][proj]["bias"])
        b = np.asarray(new["model"]["layers"]["self_attn"][proj]["bias"])
        for i in range(config.num_hidden_layers):
            p = biases[f"model.layers.{i}.self_attn.{proj}.bias"]
            assert rel_err(g[i], p.grad.numpy()) <= 1e-5, (proj, i)
            # the AdamW step: 8e-6 at most over 3 seeds, 3e-5 keeps 3.7x; an update 1% too large fails (below)
            assert rel_err(b[i], p.detach().numpy()) <= 3e-5, (proj, i)
            off = np.asarray(adapter["model"]["layers"]["self_attn"][proj]["bias"])[i] + 1.01 * (
                np.asarray(updates["model"]["layers"]["self_attn"][proj]["bias"])[i])
            assert rel_err(off, p.detach().numpy()) > 3e-5, (proj, i)
    merged = jpeft.merge(params, spec, new)
    assert rel_err(jax_logits(config, merged), jax_logits(config, jpeft.bind(params, spec, new))) <= 1e-6


def test_bitfit_targets_and_refusals(tmp_path):
    spec = jpeft.BitFitSpec(target_modules=("k_proj",))
    _, config, params = tiny_pair("qwen2", tmp_path)
    adapter = jpeft.init(spec, config, params, jax.random.key(0))
    assert set(adapter["model"]["layers"]["self_attn"]) == {"k_proj"}
    with pytest.raises(ConfigError, match="'o_proj' matches no module"):
        jpeft.init(jpeft.BitFitSpec(target_modules=("o_proj",)), config, params, jax.random.key(0))
    with pytest.raises(ConfigError, match="the model has no bias terms"):
        jpeft.init(jpeft.BitFitSpec(), CONFIG, PARAMS, jax.random.key(0))
    with pytest.raises(ValueError, match="replaces base values"):
        jpeft.unmerge(params, spec, adapter)
    with pytest.warns(UserWarning, match="BitFit"):
        jpeft.save_adapter(spec, adapter, str(tmp_path / "b"), config)
    spec2, adapter2 = jpeft.load_adapter(str(tmp_path / "b"), config)
    assert spec2 == spec
    np.testing.assert_array_equal(adapter2["model"]["layers"]["self_attn"]["k_proj"]["bias"],
                                  adapter["model"]["layers"]["self_attn"]["k_proj"]["bias"])
