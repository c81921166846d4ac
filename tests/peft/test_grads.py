"""Gradients and optimizer state only for the adapter (optax.adamw state holds exactly the adapter's leaves), and
frozen entries (rank padding, untransformed layers) that neither receive gradient nor move under weight decay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxft
from jaxft import peft as jpeft

from hf_models import rel_err
from tiny_tree import CONFIG, IDS, LINEAR, PARAMS, make_loss as _loss, noisy as _noisy  # noqa: F401


# The custom VJPs against JAX's autodiff of the plain einsums, relative to each output's largest entry: 3.9e-6 at most
# over 8 seeds (lora_linear's gradients, which go through the merged weight; lora_branch 1.2e-6) and 2.5e-7 for the
# outputs, so 2e-5 and 1e-6 keep 5x and 4x; a 1% scale error in any of them gives 1e-2. (Elementwise rtol/atol, as
# before, failed at other seeds: near-zero entries carry rounding far above their own size.)
VJP_TOL, OUT_TOL = 2e-5, 1e-6


def _expected_size(spec) -> int:
    """The stored adapter's size from the base shapes: per target module, L * r * (in + out) (every layer is stored,
    transformed or not; these specs give each module one rank), + L * out for DoRA's magnitude, + L * (in or out)
    for IA3, + the full lm_head copy of modules_to_save."""
    targets = spec.target_modules
    if targets == "all-linear":
        targets = [m for g in LINEAR.values() for m in g]
    elif isinstance(targets, str):  # the IA3 regex below
        targets = ["k_proj", "down_proj"]
    total = 0
    for g, mods in LINEAR.items():
        for m in set(mods) & set(targets):
            _, d_in, d_out = PARAMS["model"]["layers"][g][m]["kernel"].shape
            if isinstance(spec, jpeft.IA3Spec):
                total += 3 * (d_in if m == "down_proj" else d_out)
                continue
            r = dict(spec.rank_pattern).get(m, spec.r)
            total += 3 * (r * (d_in + d_out) + (d_out if isinstance(spec, jpeft.DoraSpec) else 0))
    return total + (32 * 61 if getattr(spec, "modules_to_save", ()) else 0)


@pytest.mark.parametrize("spec", [
    jpeft.LoraSpec(r=4, target_modules=("q_proj", "o_proj", "down_proj"), layers_to_transform=(0, 2),
                   rank_pattern={"down_proj": 2},
                   modules_to_save=("lm_head",)),
    jpeft.DoraSpec(r=4, target_modules=("v_proj", "up_proj"), layers_to_transform=(1,), rank_pattern={"v_proj": 3}),
    jpeft.IA3Spec(target_modules=r"model\.layers\.[01]\.(self_attn\.k_proj|mlp\.down_proj)"),
], ids=["lora_patterns_modules_to_save", "dora_layers", "ia3_regex_partial"])
def test_only_adapter_entries_train(spec):
    """Gradients and optimizer state exist only for the adapter tree; its frozen entries (padding of smaller ranks,
    untransformed layers) neither change the output, nor get gradient, nor move under AdamW's weight decay."""
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0))
    mask = jpeft.trainable_mask(spec, PARAMS, adapter)
    assert jax.tree.structure(mask) == jax.tree.structure(adapter)
    assert any(not np.all(m) for m in jax.tree.leaves(mask))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapter))
    assert n_adapter == _expected_size(spec)
    # random values everywhere, frozen entries included: they must not change the output or receive gradient
    noisy = _noisy(adapter)
    cleaned = jax.tree.map(lambda n, a, m: jnp.where(m, n, a), noisy, adapter, mask)
    value_and_grad = jax.jit(jax.value_and_grad(_loss(spec)))
    loss_noisy, grads = value_and_grad(noisy)
    loss_clean, _ = value_and_grad(cleaned)
    assert float(loss_noisy) == pytest.approx(float(loss_clean), rel=1e-6)
    assert jax.tree.structure(grads) == jax.tree.structure(adapter)
    for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)):
        assert not np.any(np.asarray(g)[~m])
        assert np.any(np.asarray(g)[m])
    opt = optax.chain(optax.adamw(1e-2, weight_decay=0.5), jpeft.mask_updates(mask))
    state, params = opt.init(cleaned), cleaned
    arrays = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
    assert len(arrays) == 2 * len(jax.tree.leaves(adapter))  # AdamW's mu and nu of each adapter leaf, nothing else
    assert sum(x.size for x in arrays) == 2 * n_adapter
    for _ in range(3):
        updates, state = opt.update(value_and_grad(params)[1], state, params)
        params = optax.apply_updates(params, updates)
    for new, old, m in zip(jax.tree.leaves(params), jax.tree.leaves(cleaned), jax.tree.leaves(mask)):
        np.testing.assert_array_equal(np.asarray(new)[~m], np.asarray(old)[~m])
        assert np.any(np.asarray(new)[m] != np.asarray(old)[m])



def test_lora_branch_custom_vjp_matches_autodiff_of_the_formula():
    """The hand-written backward of `scale * (x a) b` equals JAX's autodiff of the plain einsums (and finite
    differences, via check_grads), for every input including the scale."""
    from jax.test_util import check_grads

    from jaxft.peft.types import lora_branch

    k = jax.random.split(jax.random.key(0), 5)
    x, a = jax.random.normal(k[0], (2, 5, 12)), jax.random.normal(k[1], (12, 3))
    b, g = jax.random.normal(k[2], (3, 7)), jax.random.normal(k[3], (2, 5, 7))
    s = jnp.float32(1.7)

    def plain(x, a, b, s):
        return s * jnp.einsum("btr,ro->bto", jnp.einsum("bti,ir->btr", x, a), b)

    want = jax.vjp(plain, x, a, b, s)[1](g)
    got = jax.vjp(lora_branch, x, a, b, s)[1](g)
    for u, v in zip(got, want):
        assert rel_err(u, v) <= VJP_TOL
    assert rel_err(lora_branch(x, a, b, s), plain(x, a, b, s)) <= OUT_TOL
    check_grads(lambda *p: jnp.sum(jnp.sin(lora_branch(*p))), (x, a, b, s), order=1, modes=("rev",),
                atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("lead", [(1, 3), (2, 5), (4, 5)])  # 3, 10, 20 tokens: neither pass, the backward
def test_lora_linear_custom_vjp_matches_autodiff_of_the_formula(lead):  # only (10 > 7 out), both (20 > 12 in)
    """`x w + s (x a) b`, factored or through the merged weight depending on the token count: the output and every
    gradient (base included) equal JAX's autodiff of the plain einsums, and finite differences."""
    from jax.test_util import check_grads

    from jaxft.peft.types import lora_linear

    k = jax.random.split(jax.random.key(1), 5)
    x, w = jax.random.normal(k[0], lead + (12,)), jax.random.normal(k[4], (12, 7))
    a, b = jax.random.normal(k[1], (12, 3)), jax.random.normal(k[2], (3, 7))
    g, s = jax.random.normal(k[3], lead + (7,)), jnp.float32(1.7)

    def plain(x, w, a, b, s):
        return jnp.einsum("...i,io->...o", x, w) + s * jnp.einsum("...r,ro->...o", jnp.einsum("...i,ir->...r", x, a), b)

    want = jax.vjp(plain, x, w, a, b, s)[1](g)
    got = jax.vjp(lora_linear, x, w, a, b, s)[1](g)
    for u, v in zip(got, want):
        assert rel_err(u, v) <= VJP_TOL
    assert rel_err(lora_linear(x, w, a, b, s), plain(x, w, a, b, s)) <= OUT_TOL
    check_grads(lambda *p: jnp.sum(jnp.sin(lora_linear(*p))), (x, w, a, b, s), order=1, modes=("rev",),
                atol=2e-2, rtol=2e-2)
