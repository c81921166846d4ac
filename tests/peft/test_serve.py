"""The serving path: `to_lora` (DoRA / IA3 / irregular LoRA -> plain LoRA by truncated SVD of the merged delta,
exact at full rank, reporting numpy's tail-energy error below it), the result loading in peft, and the vLLM
warnings of `save_adapter`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from hf_models import rel_err
from jaxft import peft as jpeft
from peft_ref import jax_logits, tiny_pair, torch_logits


def _noisy(tree, scale=0.3, key=4):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


SPECS = {
    "dora_layers": jpeft.DoraSpec(r=4, target_modules=("q_proj", "down_proj"), layers_to_transform=(1,)),
    "ia3": jpeft.IA3Spec(),
    "lora_rank_pattern": jpeft.LoraSpec(r=4, target_modules=("q_proj", "up_proj"), rank_pattern={"up_proj": 2},
                                        alpha_pattern={"q_proj": 3.0}),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_to_lora_is_exact_at_full_rank_and_reports_the_svd_tail_below(name, tmp_path):
    errors = to_lora_errors(name, tmp_path)
    # Measured over model and adapter seeds 0-4, every spec (scripts/measure_model_tolerances.py --only peft):
    # reported 1.1e-6, logits 3.6e-6 (so LOGITS_TOL, formerly 1e-5, is 1.5e-5), rank 1 against numpy 1.6e-7.
    assert errors["full rank reported"] <= 1e-5 and errors["full rank logits"] <= LOGITS_TOL
    assert errors["rank 1 reported vs numpy"] <= 1e-6


def test_logits_bound_fails_a_one_percent_error(tmp_path):
    """The injected bug: the converted LoRA's B 1% too large fails LOGITS_TOL."""
    scale_b = lambda t: {k: scale_b(v) if isinstance(v, dict) else v * 1.01 if k == "lora_b" else v
                         for k, v in t.items()}
    assert to_lora_errors("dora_layers", tmp_path, bug=scale_b)["full rank logits"] > LOGITS_TOL


LOGITS_TOL = 1.5e-5


def to_lora_errors(name: str, tmp_path, seed: int = 0, bug=None) -> dict[str, float]:
    """At full rank: the largest error to_lora reports, and the logits' relative error against the source adapter;
    at rank 1: |reported - numpy's tail energy| / (1e-2 + numpy's) (rtol with an atol where numpy's is ~0).
    `bug(lora) -> lora` alters the converted adapter before the logits (injected-bug tests)."""
    _, config, params = tiny_pair("llama_mha_untied", tmp_path, seed)
    spec = SPECS[name]
    adapter = _noisy(jpeft.init(spec, config, params, jax.random.key(seed)), key=4 + seed)
    want = jax_logits(config, jpeft.bind(params, spec, adapter))
    full = min(config.hidden_size, config.intermediate_size)
    lspec, lora, errors = jpeft.to_lora(spec, adapter, params, full)
    assert isinstance(lspec, jpeft.LoraSpec) and lspec.r == full
    if bug is not None:
        lora = bug(lora)
    out = {"full rank reported": max(float(e.max()) for e in errors.values()),
           "full rank logits": rel_err(jax_logits(config, jpeft.bind(params, lspec, lora)), want)}

    _, _, errors = jpeft.to_lora(spec, adapter, params, 1)
    merged = jpeft.merge(params, spec, adapter)
    worst = 0.0
    for path, err in errors.items():
        keys = path.split(".")
        base, new = params, merged
        for k in keys:
            base, new = base[k], new[k]
        delta = np.asarray(new["kernel"], np.float64) - np.asarray(base["kernel"], np.float64)
        s = np.linalg.svd(delta, compute_uv=False)  # [L, min(in, out)]
        total = (s ** 2).sum(-1)
        ref = np.sqrt(np.where(total > 0, (s[:, 1:] ** 2).sum(-1) / np.where(total > 0, total, 1), 0))
        worst = max(worst, float(np.max(np.abs(np.asarray(err, np.float64) - ref) / (1e-2 + np.abs(ref)))))
        assert err.max() > 0.05  # rank 1 really loses something
    out["rank 1 reported vs numpy"] = worst
    return out


def test_to_lora_output_serves(tmp_path):
    """A DoRA adapter converted at a vLLM rank saves with no vLLM warning and loads in peft as a plain LoRA that
    computes what jaxft computes."""
    peft = pytest.importorskip("peft", reason="the peft library is the reference")
    _, config, params = tiny_pair("llama_mha_untied", tmp_path)
    spec = jpeft.DoraSpec(r=4, target_modules=("q_proj", "v_proj", "down_proj"))
    adapter = _noisy(jpeft.init(spec, config, params, jax.random.key(0)))
    lspec, lora, errors = jpeft.to_lora(spec, adapter, params, 8, alpha=16.0)
    assert lspec.alpha == 16.0 and set(errors) == {"model.layers.self_attn.q_proj", "model.layers.self_attn.v_proj",
                                                   "model.layers.mlp.down_proj"}
    assert jpeft.save_adapter(lspec, lora, str(tmp_path / "served"), config) == []
    fresh, _, _ = tiny_pair("llama_mha_untied", tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "served")).eval()
    assert rel_err(torch_logits(loaded), jax_logits(config, jpeft.bind(params, lspec, lora))) <= 1e-5


def test_to_lora_refuses_bias_changes_and_non_deltas(tmp_path):
    _, config, params = tiny_pair("qwen2", tmp_path)
    spec = jpeft.IA3Spec(target_modules=("k_proj", "down_proj"))
    adapter = _noisy(jpeft.init(spec, config, params, jax.random.key(0)))
    with pytest.raises(ValueError, match="changes the bias of self_attn.k_proj"):
        jpeft.to_lora(spec, adapter, params, 8)
    with pytest.raises(ValueError, match="HoulsbySpec is not a weight delta"):
        jpeft.to_lora(jpeft.HoulsbySpec(bottleneck=4), {}, params, 8)


@pytest.mark.parametrize("spec,expected", [
    (jpeft.LoraSpec(r=8, target_modules=("q_proj",)), []),
    (jpeft.LoraSpec(r=8, alpha=16, use_rslora=True, target_modules="all-linear"), []),
    (jpeft.LoraSpec(r=4, target_modules=("q_proj",)), ["rank 4"]),
    (jpeft.LoraSpec(r=8, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 16}), ["different scales"]),
    (jpeft.LoraSpec(r=8, target_modules=("q_proj",), modules_to_save=("lm_head",)), ["modules_to_save"]),
    (jpeft.DoraSpec(r=8, target_modules=("q_proj",)), ["DoRA"]),
    (jpeft.IA3Spec(), ["IA3"]),
    (jpeft.PromptTuningSpec(num_virtual_tokens=4), ["prompt tuning"]),
    (jpeft.PrefixTuningSpec(num_virtual_tokens=4), ["prefix tuning"]),
    (jpeft.HoulsbySpec(bottleneck=4), ["Houlsby"]),
], ids=lambda v: type(v).__name__ if not isinstance(v, list) else "")
def test_vllm_warnings(spec, expected, tmp_path):
    _, config, params = tiny_pair("llama_mha_untied", tmp_path)
    adapter = jpeft.init(spec, config, params, jax.random.key(0))
    if expected:
        with pytest.warns(UserWarning, match="vLLM will not serve"):
            reasons = jpeft.save_adapter(spec, adapter, str(tmp_path / "a"), config)
    else:
        reasons = jpeft.save_adapter(spec, adapter, str(tmp_path / "a"), config)
    assert len(reasons) == len(expected)
    for r, e in zip(reasons, expected):
        assert e in r
