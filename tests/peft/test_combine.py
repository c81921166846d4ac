"""combine_lora against peft 0.21's `add_weighted_adapter` on a tiny Llama, fp32, torch CPU.

Tolerances (measured over 5 seeds of the adapters, every case: scripts/measure_model_tolerances.py --only peft): the
factor types (`linear`, `ties`, `dare_*`, `magnitude_prune`, `cat`) are elementwise fp32 arithmetic in peft's order:
their factors are asserted bit-identical, their deltas (a matmul: BLAS vs XLA) equal to 1e-6 relative (Frobenius, per
projection; measured bit-equal on this CPU, the bound leaves room for another BLAS's summation order). The svd types
go through two different LAPACKs (MKL in torch, jaxlib's): deltas and factors (after each rank component's sign is
aligned: signs of singular vectors are a free choice) agree to 2.5e-5 relative (measured 7.1e-6; the former 1e-5 kept
a 1.4x margin); a 1% error in a factor still fails it (test_svd_bound_fails_a_one_percent_error).
With `svd_clamp` peft's SVD is patched to jaxft's sign convention, since the clamp threshold depends on the signs.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxft.peft.combine import LoraFactors, combine_lora
from optional_import import optional  # torch-free CI leg: tests/conftest.py
from peft_ref import BernoulliRecorder

torch = optional("torch")
peft = optional("peft")
LoraLayer = optional("peft.tuners.lora", "LoraLayer")

PROJS = ("k_proj", "up_proj")  # [32 -> 16] and [32 -> 48]: in > out and in < out
ADAPTERS = {  # name: (r, lora_alpha, use_rslora)
    "p": (4, 8, False), "q": (4, 4, False), "t": (4, 2, False), "w": (6, 12, False),
    "rs": (4, 8, True), "rs6": (6, 3, True),
}
FACTOR_TOL, SVD_TOL = 1e-6, 2.5e-5


@pytest.fixture(scope="module")
def model():
    return make_model()


def make_model(seed: int = 0):
    """A tiny peft Llama holding every adapter of ADAPTERS with random non-zero A and B (torch seeds seed, seed + 1)."""
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(seed)
    pm = None
    for name, (r, alpha, rs) in ADAPTERS.items():
        lc = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=list(PROJS))
        if pm is None:
            pm = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), lc, adapter_name=name)
        else:
            pm.add_adapter(name, lc)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in _layers(pm):
            for name in ADAPTERS:  # random, non-zero A and B (peft's default init has B = 0)
                for w in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.5)
    return pm


def _layers(pm) -> list:
    return [m for _, m in pm.named_modules() if isinstance(m, LoraLayer)]


def _by_proj(pm) -> dict[str, list]:
    return {p: [m for n, m in pm.named_modules() if isinstance(m, LoraLayer) and n.endswith(p)] for p in PROJS}


def _factors(mods, name, **kw) -> LoraFactors:
    """peft's adapter `name` on the stacked layers of one projection, in jaxft layout: a[L, in, r], b[L, r, out]."""
    a = np.stack([m.lora_A[name].weight.detach().numpy().T for m in mods])
    b = np.stack([m.lora_B[name].weight.detach().numpy().T for m in mods])
    return LoraFactors(jnp.asarray(a), jnp.asarray(b), mods[0].scaling[name], **kw)


def _peft_delta(mods, name) -> np.ndarray:
    return np.stack([m.get_delta_weight(name).detach().numpy().T for m in mods])


def _rel(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def _align_signs(a, b, a_ref):
    """Flip each rank component of (a, b) to the sign of a_ref's (per stacked module)."""
    s = np.sign(np.sum(np.asarray(a) * a_ref, axis=-2, keepdims=True))
    return np.asarray(a) * s, np.asarray(b) * np.swapaxes(s, -1, -2)


def _drop_masks(pm, rec, names, svd: bool) -> dict[str, list]:
    """Per projection, our drop_masks from peft's recorded keep masks (module order, then A's, B's per module)."""
    it = iter(rec.masks)
    per_module = {}
    for mod in _layers(pm):
        if svd:
            per_module[id(mod)] = [next(it).numpy().T == 0 for _ in names]
        else:
            da = [next(it).numpy().T == 0 for _ in names]
            db = [next(it).numpy().T == 0 for _ in names]
            per_module[id(mod)] = list(zip(da, db))
    assert next(it, None) is None, "peft drew more masks than expected"
    out = {}
    for proj, mods in _by_proj(pm).items():
        cols = [per_module[id(m)] for m in mods]
        if svd:
            out[proj] = [jnp.asarray(np.stack([c[i] for c in cols])) for i in range(len(names))]
        else:
            out[proj] = [tuple(jnp.asarray(np.stack([c[i][j] for c in cols])) for j in range(2))
                         for i in range(len(names))]
    return out


_counter = iter(range(10**6))

CASES = [  # combination_type, adapters, weights, kwargs
    ("linear", ["p", "q"], [0.7, -0.4], {}),
    ("linear", ["p", "q", "t"], [1.0, 0.5, 2.0], {}),
    ("cat", ["p", "w"], [0.7, -0.4], {}),
    ("cat", ["w", "q", "p"], [1.5, 0.3, 1.0], {}),
    ("ties", ["p", "q", "t"], [0.7, -0.4, 1.0], {"density": 0.5}),
    ("ties", ["p", "q", "t"], [0.7, 0.4, 1.0], {"density": 0.3, "majority_sign_method": "frequency"}),
    ("magnitude_prune", ["p", "q"], [0.7, -0.4], {"density": 0.4}),
    ("dare_linear", ["p", "q"], [0.7, -0.4], {"density": 0.6}),
    ("dare_ties", ["p", "q", "t"], [0.7, 0.4, 1.0], {"density": 0.5}),
    ("dare_ties", ["p", "q", "t"], [0.7, -0.4, 1.0], {"density": 0.7, "majority_sign_method": "frequency"}),
    ("ties", ["p", "q"], [0.7, -0.4], {"density": 1.0}),  # density >= 1: peft prunes nothing
    ("svd", ["p", "w"], [0.7, -0.4], {}),
    ("svd", ["p", "w", "q"], [0.7, -0.4, 1.0], {"svd_rank": 3}),
    ("svd", ["p", "w"], [1.0, 1.0], {"svd_rank": 10, "svd_full_matrices": False}),
    ("ties_svd", ["p", "w", "q"], [0.7, -0.4, 1.0], {"density": 0.5}),
    ("dare_linear_svd", ["p", "w"], [0.7, -0.4], {"density": 0.6}),
    ("dare_ties_svd", ["p", "w", "q"], [0.7, 0.4, 1.0], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", ["w", "p"], [0.7, -0.4], {"density": 0.3, "svd_rank": 5}),
    ("svd", ["w"], [0.5], {}),  # one adapter: peft (and combine_lora) switch to linear
    ("linear", ["rs", "q"], [0.7, -0.4], {}),  # rsLoRA: the new adapter gets scaling sqrt(r) in peft
    ("cat", ["rs6", "p"], [0.7, -0.4], {}),
    ("svd", ["rs", "rs6"], [0.7, 1.3], {"svd_rank": 5}),
    ("dare_ties", ["rs", "q"], [0.7, -0.4], {"density": 0.5}),
]


@pytest.mark.filterwarnings("ignore:.*density")
@pytest.mark.parametrize("ctype, names, weights, kw", CASES, ids=[f"{c[0]}-{'-'.join(c[1])}" for c in CASES])
def test_matches_peft(model, monkeypatch, ctype, names, weights, kw):
    new = f"combo{next(_counter)}"
    rec = BernoulliRecorder(monkeypatch)
    model.add_weighted_adapter(names, weights, new, combination_type=ctype, **kw)
    monkeypatch.undo()
    kind = "linear" if len(names) == 1 else ctype
    is_svd = kind.endswith("svd")
    dare = kind.startswith("dare") and kw.get("density", 1) < 1
    masks = _drop_masks(model, rec, names, is_svd) if dare else None
    if not dare:
        assert rec.masks == []
    rslora = ADAPTERS[names[0]][2]
    for proj, mods in _by_proj(model).items():
        ins = [_factors(mods, n, rslora=ADAPTERS[n][2]) for n in names]
        args = dict(kw, drop_masks=None if masks is None else masks[proj])
        ours = combine_lora(ins, weights, ctype, **args)
        ours_peft = combine_lora(ins, weights, ctype, match_peft_rslora=True, **args)
        ref = _factors(mods, new)
        cfg = model.peft_config[new]
        assert ours_peft.rank == cfg.r == ref.rank and ours_peft.alpha == cfg.lora_alpha
        assert ours_peft.rslora == cfg.use_rslora == rslora == ours.rslora
        assert ours_peft.scale == pytest.approx(ref.scale, rel=1e-12)
        assert ours.a.shape == ref.a.shape and ours.b.shape == ref.b.shape
        # The intended scale is 1 (every scale is folded into the factors); peft agrees unless rsLoRA.
        assert ours.scale == 1.0 and (ours.alpha / math.sqrt(ours.rank) if rslora else ours.alpha / ours.rank) == 1.0
        assert ref.scale == pytest.approx(math.sqrt(ref.rank) if rslora else 1.0, rel=1e-12)
        if is_svd:
            a, b = _align_signs(ours.a, ours.b, np.asarray(ref.a))
            assert _rel(a, ref.a) < SVD_TOL and _rel(b, ref.b) < SVD_TOL, proj
        else:
            assert np.array_equal(ours.a, ref.a) and np.array_equal(ours.b, ref.b), proj
        tol = SVD_TOL if is_svd else FACTOR_TOL
        assert _rel(ours_peft.delta(), _peft_delta(mods, new)) < tol, proj
        assert _rel(ours.delta() * ref.scale, _peft_delta(mods, new)) < tol, proj


def test_svd_bound_fails_a_one_percent_error(model):
    """The injected bug: an svd combination's b 1% too large is far outside SVD_TOL (factors and delta)."""
    names, weights = ["p", "w"], [0.7, -0.4]
    model.add_weighted_adapter(names, weights, "svd_bug", combination_type="svd")
    for proj, mods in _by_proj(model).items():
        ours = combine_lora([_factors(mods, n) for n in names], weights, "svd")
        ref = _factors(mods, "svd_bug")
        a, b = _align_signs(ours.a, ours.b, np.asarray(ref.a))
        assert _rel(a, ref.a) < SVD_TOL and _rel(b, ref.b) < SVD_TOL, proj
        assert _rel(b * 1.01, ref.b) > 10 * SVD_TOL, proj
        bad = LoraFactors(ours.a, ours.b * 1.01, ours.scale)
        assert _rel(bad.delta() * ref.scale, _peft_delta(mods, "svd_bug")) > 10 * SVD_TOL, proj


def test_cat_is_exact_and_linear_is_not(model):
    """cat's delta is the weighted sum of deltas; peft's linear is not (cross terms b_i a_j), documented."""
    weights = [0.7, -0.4]
    for mods in _by_proj(model).values():
        ins = [_factors(mods, n) for n in ("p", "q")]
        want = sum(w * np.asarray(f.delta()) for w, f in zip(weights, ins))
        assert _rel(combine_lora(ins, weights, "cat").delta(), want) < FACTOR_TOL
        assert _rel(combine_lora(ins, weights, "linear").delta(), want) > 0.1


def test_svd_clamp_matches_peft_under_same_signs(model, monkeypatch):
    orig = torch.linalg.svd

    def svd_fixed_signs(m, *args, **kwargs):  # jaxft's convention: largest |entry| of each Vh row positive
        u, s, vh = orig(m, *args, **kwargs)
        k = s.shape[-1]
        idx = vh[:k].abs().argmax(dim=-1)
        sign = torch.where(vh[:k].gather(-1, idx[:, None])[:, 0] < 0, -1.0, 1.0)
        u, vh = u.clone(), vh.clone()
        u[:, :k] *= sign
        vh[:k] *= sign[:, None]
        return u, s, vh

    monkeypatch.setattr(torch.linalg, "svd", svd_fixed_signs)
    names, weights, kw = ["p", "w"], [0.7, -0.4], {"svd_clamp": 0.9, "svd_rank": 5}
    model.add_weighted_adapter(names, weights, "clamped", combination_type="svd", **kw)
    monkeypatch.undo()
    for proj, mods in _by_proj(model).items():
        ours = combine_lora([_factors(mods, n) for n in names], weights, "svd", **kw)
        ref = _factors(mods, "clamped")
        assert _rel(ours.a, ref.a) < SVD_TOL and _rel(ours.b, ref.b) < SVD_TOL, proj
        hi = np.abs(np.asarray(ref.b)).max()
        assert np.mean(np.isclose(np.abs(np.asarray(ref.b)), hi)) > 0.05, "the clamp did not bite"


REFUSALS = [  # peft raises ValueError, TypeError or RuntimeError; combine_lora a ValueError
    ("linear", ["p", "w"], [1.0, 1.0], {}, "same rank"),
    ("dare_ties", ["p", "w"], [1.0, 1.0], {"density": 0.5}, "same rank"),
    ("nonsense", ["p", "q"], [1.0, 1.0], {}, "invalid combination_type"),
    ("ties", ["p", "q"], [1.0, 1.0], {}, "density"),
    ("dare_linear_svd", ["p", "q"], [1.0, 1.0], {"density": -0.1}, "density"),
    ("ties_svd", ["p", "q"], [1.0, 1.0], {"density": 0.5, "majority_sign_method": "mean"}, "majority_sign_method"),
    ("svd", ["p", "w"], [1.0, 1.0], {"svd_clamp": 1.5}, "svd_clamp"),
]


@pytest.mark.parametrize("ctype, names, weights, kw, match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refuses_where_peft_raises(model, ctype, names, weights, kw, match):
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        model.add_weighted_adapter(names, weights, f"bad{next(_counter)}", combination_type=ctype, **kw)
    mods = _by_proj(model)["k_proj"]
    with pytest.raises(ValueError, match=match) as err:
        combine_lora([_factors(mods, n) for n in names], weights, ctype, key=None, **kw)
    assert "\n" not in str(err.value)


def test_refuses_where_peft_misbehaves(model):
    mods = _by_proj(model)["k_proj"]  # [32 -> 16]
    ins = [_factors(mods, n) for n in ("p", "q")]
    with pytest.raises(ValueError, match="weights"):
        combine_lora(ins, [1.0], "linear")
    with pytest.raises(ValueError, match="svd rank 17"):
        combine_lora(ins, [1.0, 1.0], "svd", svd_rank=17)
    with pytest.raises(ValueError, match="exactly one of key"):
        combine_lora(ins, [1.0, 1.0], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match="combine adapters of one module"):
        combine_lora([ins[0], _factors(_by_proj(model)["up_proj"], "q")], [1.0, 1.0], "cat")


def test_dare_with_key_draws_masks(model):
    import jax

    mods = _by_proj(model)["up_proj"]
    ins = [_factors(mods, n) for n in ("p", "q")]
    key = jax.random.key(0)
    out = combine_lora(ins, [0.7, 0.4], "dare_linear", density=0.5, key=key)
    again = combine_lora(ins, [0.7, 0.4], "dare_linear", density=0.5, key=key)
    other = combine_lora(ins, [0.7, 0.4], "dare_linear", density=0.5, key=jax.random.key(1))
    assert out.a.shape == ins[0].a.shape and np.array_equal(out.a, again.a) and not np.array_equal(out.a, other.a)
    out_svd = combine_lora(ins, [0.7, 0.4], "dare_ties_svd", density=0.5, key=key)
    assert out_svd.a.shape == ins[0].a.shape


# ---------------------------------------------------------------------------------------------------------------
# Merges of dense deltas against peft.utils.merge_utils (the functions peft's svd types call), stacked [2, in, out].


def _deltas(seed=3, n=3, shape=(2, 24, 40)):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def _torch_per_module(fn, deltas, weights, *args):
    """peft's merge applied per stacked module (peft sees one [out, in] matrix at a time)."""
    w = torch.tensor(weights)
    out = [fn([torch.from_numpy(d[i].T.copy()) for d in deltas], w, *args).numpy().T for i in range(deltas[0].shape[0])]
    return np.stack(out)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_delta_merges_match_merge_utils(method):
    from peft.utils import merge_utils as mu

    from jaxft.peft.combine import magnitude_prune_deltas, task_arithmetic, ties_deltas

    ds, w = _deltas(), [0.7, -0.4, 1.2]
    assert np.array_equal(task_arithmetic(ds, w), _torch_per_module(mu.task_arithmetic, ds, w))
    assert np.array_equal(magnitude_prune_deltas(ds, w, 0.3), _torch_per_module(mu.magnitude_prune, ds, w, 0.3))
    got = ties_deltas(ds, w, 0.4, method)
    assert np.array_equal(got, _torch_per_module(mu.ties, ds, w, 0.4, method))
    assert 0.2 < np.mean(np.asarray(got) == 0) < 0.7  # pruning and sign election did zero entries


@pytest.mark.parametrize("method, rescale", [(None, True), ("total", True), ("frequency", True), (None, False)])
def test_dare_deltas_match_merge_utils(monkeypatch, method, rescale):
    from peft.utils import merge_utils as mu

    from jaxft.peft.combine import dare_deltas

    ds, w, density = _deltas(), [0.7, -0.4, 1.2], 0.6
    rec = BernoulliRecorder(monkeypatch)
    if rescale:
        fn = mu.dare_linear if method is None else functools.partial(mu.dare_ties, majority_sign_method=method)
        ref = _torch_per_module(fn, ds, w, density)
    else:  # Yu et al. without the rescaling: peft's random prune (rescale=False), then task arithmetic
        def fn(ts, ws, d):
            return mu.task_arithmetic([mu.prune(t, d, "random", rescale=False) for t in ts], ws)
        ref = _torch_per_module(fn, ds, w, density)
    monkeypatch.undo()
    keep = np.stack([m.numpy().T for m in rec.masks]).reshape(ds[0].shape[0], len(ds), *ds[0].shape[1:])
    drops = [jnp.asarray(keep[:, i] == 0) for i in range(len(ds))]
    got = dare_deltas(ds, w, density, drop_masks=drops, rescale=rescale, majority_sign_method=method)
    assert np.array_equal(got, ref)


def test_dare_deltas_key_draws_density():
    import jax

    from jaxft.peft.combine import dare_deltas, draw_drop_masks

    ds = [np.ones((64, 64), np.float32)] * 2
    masks = draw_drop_masks(jax.random.key(0), [d.shape for d in ds], 0.3)
    assert abs(float(np.mean([np.mean(m) for m in masks])) - 0.7) < 0.02  # drop probability 1 - density
    got = dare_deltas(ds, [1.0, 1.0], 0.3, key=jax.random.key(0))
    want = dare_deltas(ds, [1.0, 1.0], 0.3, drop_masks=masks)
    assert np.array_equal(got, want)
    assert np.allclose(np.unique(np.asarray(got)), [0.0, 1 / 0.3, 2 / 0.3], rtol=1e-6)


def test_lora_factors_is_a_pytree_with_static_scale():
    import jax

    lf = LoraFactors(jnp.ones((2, 8, 3)), jnp.ones((2, 3, 5)), 0.5, alpha=4.0, rslora=True)
    assert len(jax.tree_util.tree_leaves(lf)) == 2 and lf.rank == 3
    out = jax.jit(lambda f: f.delta())(lf)
    assert out.shape == (2, 8, 5) and np.allclose(out, 1.5)
