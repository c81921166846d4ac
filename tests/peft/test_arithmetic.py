"""`peft.add_weighted_adapter` on whole adapters against peft's `add_weighted_adapter` over a whole tiny Llama, for
every combination type peft has: the new adapter's config (rank, scale), every module's factors (bit-identical for the
factor types and `cat`, as combine_lora per module; the svd types to SVD_TOL after aligning each rank component's
sign, see test_combine.py) and the logits. DARE's random masks are recorded from peft's `torch.bernoulli` draws and
passed in, as test_combine.py does per module."""

from __future__ import annotations

import numpy as np
import pytest

from hf_models import rel_err
from jaxft import peft as jpeft
from peft_ref import BernoulliRecorder, jax_logits, tiny_pair, torch_logits

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peft.tuners.lora import LoraLayer  # noqa: E402

# Factor types are the same fp32 elementwise arithmetic as peft's (bit-identical factors). The svd types go through
# two LAPACKs: factors (sign-aligned; relative to the largest entry) differed by up to 1.5e-5 (dare_linear_svd,
# down_proj), so 1e-4; their products, which do not depend on how the SVD splits near-equal singular values, by
# SVD_DELTA_TOL (Frobenius, as test_combine.py). Logits: the parity bound of test_parity_lora (3.7e-6 measured at
# most, dare_ties_svd: 5.4x).
SVD_FACTOR_TOL, SVD_DELTA_TOL, LOGITS_TOL = 1e-4, 1e-5, 2e-5
TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTERS = {"default": (4, 8), "b": (4, 4), "c": (6, 3)}  # name: (r, lora_alpha)

CASES = [  # combination_type, adapters, weights, options
    ("svd", ["default", "c"], [0.7, -0.4], {}),
    ("linear", ["default", "b"], [0.7, -0.4], {}),
    ("cat", ["default", "b", "c"], [1.0, 0.5, -0.3], {}),
    ("ties", ["default", "b"], [0.7, 0.4], {"density": 0.5}),
    ("ties_svd", ["default", "b", "c"], [0.7, -0.4, 1.0], {"density": 0.5}),
    ("dare_linear", ["default", "b"], [0.7, -0.4], {"density": 0.6}),
    ("dare_ties", ["default", "b"], [0.7, 0.4], {"density": 0.5, "majority_sign_method": "frequency"}),
    ("dare_linear_svd", ["default", "c"], [0.7, -0.4], {"density": 0.6}),
    ("dare_ties_svd", ["default", "b", "c"], [0.7, 0.4, 1.0], {"density": 0.5}),
    ("magnitude_prune", ["default", "b"], [0.7, -0.4], {"density": 0.4}),
    ("magnitude_prune_svd", ["c", "default"], [0.7, -0.4], {"density": 0.3, "svd_rank": 5}),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arith")
    model, config, params = tiny_pair("llama_mha_untied", tmp)
    pm = None
    for name, (r, alpha) in ADAPTERS.items():
        lc = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS)
        pm = peft.get_peft_model(model, lc, adapter_name=name) if pm is None else pm
        if name != "default":
            pm.add_adapter(name, lc)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in _layers(pm):
            for name in ADAPTERS:  # random non-zero A and B (peft's init has B = 0)
                for w in (m.lora_A[name].weight, m.lora_B[name].weight):
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    pm.eval()
    ours = {name: _load(pm, name, tmp, config) for name in ADAPTERS}
    return pm, config, params, ours, tmp


def _layers(pm) -> list:
    return [m for _, m in pm.named_modules() if isinstance(m, LoraLayer)]


def _load(pm, name, tmp, config):
    """jaxft's (spec, adapter) of peft's adapter `name`, through peft's own file."""
    d = tmp / f"saved_{name}"
    pm.save_pretrained(str(d), selected_adapters=[name])
    return jpeft.load_adapter(str(d if name == "default" else d / name), config)


def _drop_masks(pm, rec, n: int, svd: bool) -> dict:
    """Per module path, combine_lora's drop masks (stacked over layers) from peft's keep masks (module order; per
    module all A's then all B's, or one [out, in] mask per adapter for the svd types)."""
    it = iter(rec.masks)
    per: dict = {}
    for mod_name, mod in pm.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        parts = mod_name.split(".")
        path = ".".join(["model", "layers", *parts[parts.index("layers") + 2:]])
        if svd:
            masks = [next(it).numpy().T == 0 for _ in range(n)]
        else:
            da = [next(it).numpy().T == 0 for _ in range(n)]
            masks = list(zip(da, [next(it).numpy().T == 0 for _ in range(n)]))
        per.setdefault(path, []).append(masks)
    assert next(it, None) is None, "peft drew more masks than expected"
    out = {}
    for path, layers in per.items():  # [layer][adapter] -> [adapter] stacked over layers
        if svd:
            out[path] = [np.stack([lay[i] for lay in layers]) for i in range(n)]
        else:
            out[path] = [tuple(np.stack([lay[i][j] for lay in layers]) for j in range(2)) for i in range(n)]
    return out


def _align_signs(a, b, a_ref):
    s = np.sign(np.sum(np.asarray(a) * a_ref, axis=-2, keepdims=True))
    return np.asarray(a) * s, np.asarray(b) * np.swapaxes(s, -1, -2)


_count = iter(range(1000))


@pytest.mark.filterwarnings("ignore:.*density")
@pytest.mark.parametrize("ctype, names, weights, kw", CASES, ids=[c[0] for c in CASES])
def test_whole_adapters_combine_as_peft(setup, monkeypatch, ctype, names, weights, kw):
    pm, config, params, ours, tmp = setup
    new = f"combo{next(_count)}"
    rec = BernoulliRecorder(monkeypatch)
    pm.add_weighted_adapter(names, weights, new, combination_type=ctype, **kw)
    monkeypatch.undo()
    svd = ctype.endswith("svd")
    masks = _drop_masks(pm, rec, len(names), svd) if ctype.startswith("dare") else None
    spec, adapter = jpeft.add_weighted_adapter([ours[n][0] for n in names], [ours[n][1] for n in names], weights,
                                               ctype, params=params, drop_masks=masks, **kw)
    ref_spec, ref = _load(pm, new, tmp, config)
    assert (spec.r, spec.alpha, spec.use_rslora) == (ref_spec.r, ref_spec.alpha, ref_spec.use_rslora)
    assert set(spec.target_modules) == set(ref_spec.target_modules) == set(TARGETS)
    mods = [(g, m) for g in ("self_attn", "mlp") for m in adapter["model"]["layers"].get(g, {})]
    assert {m for _, m in mods} == set(TARGETS)
    for g, m in mods:
        got, want = adapter["model"]["layers"][g][m]["kernel"], ref["model"]["layers"][g][m]["kernel"]
        a, b, ra, rb = (np.asarray(x) for x in (got["lora_a"], got["lora_b"], want["lora_a"], want["lora_b"]))
        assert a.shape == ra.shape and b.shape == rb.shape, m
        if svd:
            delta, ref_delta = np.einsum("lir,lro->lio", a, b), np.einsum("lir,lro->lio", ra, rb)
            assert np.linalg.norm(delta - ref_delta) <= SVD_DELTA_TOL * np.linalg.norm(ref_delta), m
            a, b = _align_signs(a, b, ra)
            assert rel_err(a, ra) < SVD_FACTOR_TOL and rel_err(b, rb) < SVD_FACTOR_TOL, m
        else:
            assert np.array_equal(a, ra) and np.array_equal(b, rb), m
    pm.set_adapter(new)
    want_logits = torch_logits(pm)
    got_logits = jax_logits(config, jpeft.bind(params, spec, adapter))
    assert rel_err(got_logits, want_logits) <= LOGITS_TOL
    pm.set_adapter("default")


def test_refusals_name_the_adapter(setup):
    pm, config, params, ours, tmp = setup
    (s0, a0), (s1, a1) = ours["default"], ours["c"]
    with pytest.raises(ValueError, match="same rank"):
        jpeft.add_weighted_adapter([s0, s1], [a0, a1], [1.0, 1.0], "linear", params=params)
    other = jpeft.LoraSpec(r=4, alpha=8.0, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="adapt different modules"):
        jpeft.add_weighted_adapter([s0, other], [a0, a0], [1.0, 1.0], "cat", params=params)
    with pytest.raises(ValueError, match="invalid combination_type"):
        jpeft.add_weighted_adapter([s0, s0], [a0, a0], [1.0, 1.0], "mean", params=params)
