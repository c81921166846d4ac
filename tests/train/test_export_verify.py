"""The export check on a model's first layers only (`jaxft.train.verify`), against transformers and peft (torch CPU,
fp32) on a tiny random Qwen2 of 4 layers (q/k/v biases, tied embeddings, a per-layer `layer_types` list in its
config): the cut merged model and the cut adapter agree with jaxft's cut model to a relative 5e-4 (see TOL), a changed tensor
in a checked layer is caught, the byte estimate equals 4 x torch's parameter count, the automatic plan checks
fewer layers when memory is short and all of them when it is not, and the reports say which."""

from __future__ import annotations

import json
import os
import shutil
import types

import jax
import numpy as np
import pytest

import jaxft
from jaxft import peft as jpeft
from hf_models import rel_err
from jaxft.train import verify
from jaxft.train.config import method_spec, parse_config
from jaxft.train.exports import export_all
from jaxft.train.step import StaticModel
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")

# Measured over 4 seeds of adapter values (scripts/measure_train_tolerances.py): LoRA 1.4e-4 on all 4 layers (adapter
# and merged; this random adapter is as large as the weights and the error grows through the layers), 1.9e-5 on the
# first 2, prefix 1.3e-6: 3.7x under the bound. A changed tensor in a checked layer gives > 1e-3 (tested below).
TOL = 5e-4
LAYERS, K = 4, 2
METHODS = {"lora": {"type": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
           "prefix": {"type": "prefix", "num_virtual_tokens": 3}, "bitfit": {"type": "bitfit"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 4-layer Qwen2 saved by transformers, its jaxft (config, params), probe rows and a data file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("export_verify")
    config = AutoConfig.for_model("qwen2", vocab_size=97, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.2,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norms and biases so that every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp / "model"))
    (tmp / "train.jsonl").write_text('{"text": "unused"}\n')
    cfg_j, params = jaxft.load_pretrained(str(tmp / "model"))
    ids = np.random.default_rng(0).integers(0, 97, (2, 11))
    return types.SimpleNamespace(tmp=tmp, hf=model, config=cfg_j, params=params, ids=ids, adapters={},
                                 prepared=types.SimpleNamespace(eval=[types.SimpleNamespace(ids=r) for r in ids]))


# Unrolled layers: eager op-by-op execution is cached across the many probes here, an eager `scan` recompiles its
# body on every call (the two paths agree: tests/peft's test_scan_matches_unrolled).
UNROLLED = jaxft.ModelOptions(scan_layers=False)


def _run(tiny, name: str, method: str = "lora", **export):
    """`(cfg, model, trainable, frozen)` of a finished run: the method's adapter with random values everywhere."""
    raw = {"output_dir": str(tiny.tmp / name), "model": {"path": str(tiny.tmp / "model")},
           "data": {"train": [str(tiny.tmp / "train.jsonl")]}, "method": METHODS[method],
           "export": dict({"adapter": True, "merged": method == "lora", "verify": "on"}, **export)}
    cfg = parse_config(raw)
    spec = method_spec(cfg.method)
    if method not in tiny.adapters:
        adapter = jpeft.init(spec, tiny.config, tiny.params, jax.random.key(1))
        rng = np.random.default_rng(2)  # LoRA's B starts at zero: move every factor
        tiny.adapters[method] = jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), adapter)
    return cfg, StaticModel(tiny.config, spec, UNROLLED), tiny.adapters[method], tiny.params


def _export(tiny, name: str, method: str = "lora", **export):
    cfg, model, adapter, frozen = _run(tiny, name, method, **export)
    out = export_all(cfg, model, adapter, frozen, None, tiny.prepared, {"eval loss": 1.0})
    assert not [f for f in os.listdir(cfg.output_dir) if f.startswith(".jaxft-verify")]  # scratch dirs removed
    return out, cfg, model, adapter, frozen


def _card(d: str) -> str:
    return open(os.path.join(d, "README.md")).read()


def test_first_layers_of_merged_and_lora_exports_match_transformers_and_peft(tiny):
    out, cfg, model, adapter, frozen = _export(tiny, "forced_lora", verify_layers=K)
    for kind in ("adapter", "merged"):
        assert out[f"{kind} verify (rel. err)"] <= TOL, out
        assert out[f"{kind} verify (checked)"].startswith(f"first {K} of {LAYERS} layers (export.verify_layers={K}")
        assert f"on first {K} of {LAYERS} layers" in _card(out[kind])
    # the cut model is a different function from the whole one: the agreement above is not the full check's
    full, cut = (verify.probe_logits(model, adapter, frozen, tiny.ids, k) for k in (None, K))
    assert rel_err(cut, full) > 1e-2
    assert verify.verify_merged(out["merged"], full, tiny.ids, layers=K) > 1e-2


def test_first_layers_of_prefix_adapter_match_peft(tiny):
    out, cfg, *_ = _export(tiny, "forced_prefix", method="prefix", verify_layers=K)
    assert out["adapter verify (rel. err)"] <= TOL, out
    assert out["adapter verify (checked)"].startswith(f"first {K} of {LAYERS} layers")


def test_truncated_files_hold_only_the_checked_layers(tiny):
    out, *_ = _export(tiny, "files", verify="off")
    d = verify.write_truncated_model(out["merged"], str(tiny.tmp / "cut_model"), K)
    hf = json.load(open(os.path.join(d, "config.json")))
    assert hf["num_hidden_layers"] == K and hf["layer_types"] == ["full_attention"] * K
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
        names = set(f.keys())
    want = {n for n, _ in tiny.hf.state_dict().items() if ".layers." not in n or int(n.split(".")[2]) < K}
    want.discard("lm_head.weight")  # tied: transformers does not save it
    assert names == want
    a = verify.write_truncated_adapter(out["adapter"], str(tiny.tmp / "cut_adapter"), K)
    with safe_open(os.path.join(a, "adapter_model.safetensors"), "np") as f:
        layers = {int(n.split(".layers.")[1].split(".")[0]) for n in f.keys()}
    assert layers == set(range(K))


def _corrupt(src: str, dst: str, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    path = os.path.join(dst, "adapter_model.safetensors" if "adapter" in src else "model.safetensors")
    tensors = load_file(path)
    tensors[name] = tensors[name] + 0.05 * np.random.default_rng(3).standard_normal(tensors[name].shape)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, path, metadata={"format": "pt"})


def test_a_changed_tensor_in_a_checked_layer_is_caught(tiny):
    out, cfg, model, adapter, frozen = _export(tiny, "corrupt", verify="off")
    cut = verify.probe_logits(model, adapter, frozen, tiny.ids, K)
    bad = str(tiny.tmp / "corrupt_merged")
    _corrupt(out["merged"], bad, "model.layers.0.mlp.down_proj.weight")
    assert verify.verify_merged(out["merged"], cut, tiny.ids, layers=K) <= TOL  # the intact export passes
    assert verify.verify_merged(bad, cut, tiny.ids, layers=K) > 1e-3
    bad = str(tiny.tmp / "corrupt_adapter")
    _corrupt(out["adapter"], bad, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert verify.verify_adapter(cfg.model.path, bad, cut, tiny.ids, layers=K) > 1e-3
    # a layer the partial check does not load is not seen: the report's "first K of N layers" is what it means
    bad = str(tiny.tmp / "corrupt_merged_late")
    _corrupt(out["merged"], bad, f"model.layers.{LAYERS - 1}.mlp.down_proj.weight")
    assert verify.verify_merged(bad, cut, tiny.ids, layers=K) <= TOL


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())  # shared (tied) tensors counted once


def test_memory_estimate_is_torch_fp32_size_and_plan_fits_the_budget(tiny):
    per_layer, total = _numel(tiny.hf.model.layers[0]), _numel(tiny.hf)
    plan = verify.plan_verify(tiny.config, available=10**12)
    assert plan.need_bytes == 4 * total and plan.layers == LAYERS and not plan.partial
    # a budget (half the available memory) that holds all but the last two layers plans exactly the first two
    budget = 4 * (total - 2 * per_layer)
    assert verify.plan_verify(tiny.config, available=2 * budget).layers == LAYERS - 2
    assert verify.plan_verify(tiny.config, available=2 * budget - 1).layers == LAYERS - 3
    assert verify.plan_verify(tiny.config, available=1).layers == 1  # never fewer than one layer
    assert verify.plan_verify(tiny.config, forced=LAYERS + 5, available=1).layers == LAYERS
    # with the adapter: peft's LoRA modules come on top of the base model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, cfg, model, adapter, frozen = _export(tiny, "count", verify="off")
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.path), out["adapter"])
    lora = _numel(pm) - total
    assert lora > 0
    assert verify.plan_verify(tiny.config, adapter=adapter, available=10**12).need_bytes == 4 * (total + lora)


def test_auto_plan_checks_first_layers_when_memory_is_short_and_all_when_it_fits(tiny, monkeypatch):
    total, per_layer = _numel(tiny.hf), _numel(tiny.hf.model.layers[0])
    # half the available memory holds the merged model without its last two layers; the adapter check also needs
    # each layer's LoRA factors (fewer than a layer's weights), so two layers' room holds one adapted layer
    monkeypatch.setattr(verify, "available_memory", lambda: 2 * 4 * (total - 2 * per_layer))
    out, *_ = _export(tiny, "auto_short", verify="auto")
    assert out["merged verify (checked)"].startswith(f"first {LAYERS - 2} of {LAYERS} layers (the whole model needs")
    assert out["adapter verify (checked)"].startswith(f"first 1 of {LAYERS} layers (the whole model and adapter")
    assert "at most half of it used" in out["merged verify (checked)"]
    assert out["merged verify (rel. err)"] <= TOL and out["adapter verify (rel. err)"] <= TOL
    assert f"on first {LAYERS - 2} of {LAYERS} layers" in _card(out["merged"])

    monkeypatch.setattr(verify, "available_memory", lambda: 64 * 2**30)
    out, *_ = _export(tiny, "auto_fits", verify="auto")
    for kind in ("adapter", "merged"):
        assert out[f"{kind} verify (checked)"].startswith(f"all {LAYERS} layers"), out
        assert out[f"{kind} verify (rel. err)"] <= TOL
        assert f"on all {LAYERS} layers" in _card(out[kind])


def test_adapter_in_jaxft_format_is_reported_not_checked(tiny):
    """BitFit (and Houlsby) adapters are written in jaxft's own format, which peft cannot load: the check says so
    instead of failing the end of the run; the merged export is still checked."""
    out, *_ = _export(tiny, "bitfit", method="bitfit", merged=True, verify_layers=K)
    assert "adapter verify (rel. err)" not in out
    assert "not run: peft cannot load" in _card(out["adapter"])
    assert out["merged verify (rel. err)"] <= TOL


def test_partial_base_from_gguf_loads_in_transformers(tmp_path, smollm_dir):
    """The embedded SmolLM2 GGUF cut to 1 of its 30 layers: only layer 0, the embeddings and the final norm are
    dequantised (jaxft's GGUF reader, filtered), and transformers loads and runs the result."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    d = verify.write_truncated_model("smollm2-135m-instruct", str(tmp_path / "cut"), 1)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    assert m.config.num_hidden_layers == 1 and len(m.model.layers) == 1
    with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert names == set(m.state_dict()) - {"lm_head.weight"}  # tied head: not stored
    with torch.no_grad():
        logits = m(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 49152) and torch.isfinite(logits).all()
