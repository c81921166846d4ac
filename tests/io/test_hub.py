"""`model.path` as a Hub id (resolved through huggingface_hub's cache; no network here), and what an adapter names
as its base model."""

import hashlib

import pytest

import jaxft
from jaxft.errors import FileFormatError
from jaxft.io.default import (DEFAULT_MODEL_HUB_ID, base_model_id, embedded_model_path, resolve_model_path,
                              weights_provenance)
from hf_models import hf_tiny, rel_err
from optional_import import optional  # torch-free CI leg: tests/conftest.py

torch = optional("torch")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty HF_HOME for this test, offline (huggingface_hub reads both at import, so its constants are set)."""
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


def _place_in_cache(cache, repo_id, model):
    """Lay `model` out as huggingface_hub's cache holds a downloaded snapshot: refs/main -> snapshots/<commit>/."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / COMMIT
    model.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snap


def test_offline_hub_id_not_in_cache_is_one_line(hub_cache):
    # before: "someorg/tiny-llama: no such file or directory", which does not say that a Hub id was looked up
    with pytest.raises(FileFormatError) as e:
        jaxft.load_config("someorg/tiny-llama")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("someorg/tiny-llama: no such local directory")
    assert "not in the Hugging Face cache" in msg and "HF_HUB_OFFLINE is set" in msg and str(hub_cache) in msg


def test_hub_id_from_the_cache(hub_cache):
    model = hf_tiny("llama_gqa_tied")
    snap = _place_in_cache(hub_cache, "someorg/tiny-llama", model)
    assert resolve_model_path("someorg/tiny-llama") == str(snap)
    config, params = jaxft.load_pretrained("someorg/tiny-llama")
    assert config == jaxft.load_config(str(snap))
    ids = torch.arange(7)[None] % config.vocab_size
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    # the same weights as the snapshot: jaxft vs transformers at 1e-5 (largest measured 9.8e-7 over 2 variants,
    # seeds 0-3, 3 inputs each: a 10x margin; a 1% scale error on a weight is ~1e-2)
    assert rel_err(jaxft.forward(config, params, ids.numpy()), ref) <= 1e-5
    assert base_model_id("someorg/tiny-llama") == "someorg/tiny-llama"
    assert base_model_id(str(snap)) == "someorg/tiny-llama"  # a cache snapshot is named by its Hub id


def test_base_model_id(tmp_path, monkeypatch):
    assert base_model_id("smollm2-135m-instruct") == DEFAULT_MODEL_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "org" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a relative local directory of the Hub-id form is local, named by its absolute path
    assert base_model_id("org/m") == str(tmp_path / "org" / "m")
    assert base_model_id("./org/m") == str(tmp_path / "org" / "m")


def test_autopeft_resolves_a_local_base_directory(tmp_path):
    """An adapter whose base_model_name_or_path is base_model_id(local dir) loads with AutoPeftModelForCausalLM."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    base = tmp_path / "base"
    hf_tiny("llama_gqa_tied").save_pretrained(base)
    model = get_peft_model(hf_tiny("llama_gqa_tied"), LoraConfig(r=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = base_model_id(str(base))
    model.save_pretrained(tmp_path / "adapter")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert loaded.peft_config["default"].base_model_name_or_path == str(base)


def test_embedded_weights_provenance():
    line = weights_provenance("smollm2-135m-instruct")
    with open(embedded_model_path(), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    assert "\n" not in line and DEFAULT_MODEL_HUB_ID in line and "Q4_1" in line and f"sha256 {digest}" in line
    assert "differ slightly" in line
