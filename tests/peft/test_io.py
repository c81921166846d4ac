"""peft interchange beyond the methods' math: modules_to_save as peft saves and loads them (untied and tied
embeddings), and the refusals of files jaxft cannot represent, each naming what is wrong."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest

from hf_models import rel_err
from jaxft import peft as jpeft
from jaxft.errors import FileFormatError
from jaxft.schema import ConfigError
from optional_import import optional  # torch-free CI leg: tests/conftest.py
from peft_ref import hf_state, jax_logits, jax_state, randomize, tiny_pair, torch_logits

peft = optional("peft")

TOL = 1e-5


@pytest.mark.parametrize("variant,saved,tying", [
    ("llama_mha_untied", ["lm_head", "embed_tokens"], False),
    ("llama_gqa_tied", ["embed_tokens"], True),
])
def test_modules_to_save_match_peft_both_ways(variant, saved, tying, tmp_path):
    model, config, params = tiny_pair(variant, tmp_path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    modules_to_save=list(saved), ensure_weight_tying=tying))
    randomize(pm)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    spec, adapter = jpeft.load_adapter(str(tmp_path / "peft"), config)
    assert set(spec.modules_to_save) == set(saved)
    got = jax_logits(config, jpeft.bind(params, spec, adapter))
    assert rel_err(got, torch_logits(pm)) <= TOL
    merged = jpeft.merge(params, spec, adapter)
    ref = hf_state(pm.merge_and_unload())
    for name, value in jax_state(config, merged).items():
        assert rel_err(value, ref[name]) <= TOL, name

    with pytest.warns(UserWarning, match="modules_to_save"):
        jpeft.save_adapter(spec, adapter, str(tmp_path / "jaxft"), config)
    fresh, _, _ = tiny_pair(variant, tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "jaxft")).eval()
    assert rel_err(torch_logits(loaded), got) <= TOL
    from safetensors.numpy import load_file

    theirs, ours = load_file(str(tmp_path / "peft/adapter_model.safetensors")), load_file(
        str(tmp_path / "jaxft/adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(theirs[k], ours[k])


def test_tied_embeddings_without_weight_tying_are_refused(tmp_path):
    model, config, _ = tiny_pair("llama_gqa_tied", tmp_path)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"]))
    pm.save_pretrained(str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="ensure_weight_tying"):
        jpeft.load_adapter(str(tmp_path / "a"), config)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    model, config, params = tiny_pair("llama_mha_untied", tmp)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    pm.save_pretrained(str(tmp / "adapter"))
    return tmp / "adapter", config


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "adapter_config.json")) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


@pytest.mark.parametrize("changes,message", [
    (dict(peft_type="LOHA"), "peft_type 'LOHA' is not supported"),
    (dict(bias="all"), "option bias='all'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(loftq_config={"loftq_bits": 4}), "option loftq_config"),
    (dict(fan_in_fan_out=True), "option fan_in_fan_out=True"),
    (dict(lora_bias=True), "option lora_bias=True"),
    (dict(layer_replication=[[0, 1]]), "option layer_replication"),
    (dict(task_type="SEQ_CLS"), "task_type 'SEQ_CLS'"),
    (dict(target_modules=["c_attn"]),
     r"adapter_config\.json\.target_modules: 'c_attn' matches no module; the modules are: .*self_attn\.q_proj"),
    (dict(r=8), r"lora_A\.weight' has shape \(4, (32|64)\), the model expects \(8, (32|64)\)"),
    (dict(target_modules=["q_proj"]), r"down_proj\.lora_A\.weight' does not belong to this adapter config"),
    (dict(target_modules=["q_proj", "down_proj", "k_proj"]), r"missing tensor .*k_proj\.lora_A\.weight"),
])
def test_bad_peft_files_are_refused_by_name(lora_dir, changes, message, tmp_path):
    src, config = lora_dir
    with pytest.raises((ConfigError, ValueError), match=message):
        jpeft.load_adapter(_edited(src, tmp_path / "x", **changes), config)


def test_shapes_of_another_model_are_refused(lora_dir, tmp_path):
    src, config = lora_dir
    wrong = r"down_proj\.lora_B\.weight' has shape \(32, 4\), the model expects \(48, 4\)"
    with pytest.raises(ValueError, match=wrong):
        jpeft.load_adapter(str(src), config.replace(hidden_size=48, head_dim=12))


def test_pickled_weights_are_refused(lora_dir, tmp_path):
    src, config = lora_dir
    d = tmp_path / "bin"
    shutil.copytree(src, d)
    os.replace(d / "adapter_model.safetensors", d / "adapter_model.bin")
    with pytest.raises(FileFormatError, match="adapter_model.bin"):
        jpeft.load_adapter(str(d), config)


def test_auto_peft_model_loads_the_base_named_in_the_config(tmp_path, monkeypatch):
    """`base_model_name_or_path` is written as given, so peft's `AutoPeftModelForCausalLM` finds a local base
    directory by it (offline: nothing is looked up on the Hub) and computes jaxft's logits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, config, params = tiny_pair("llama_gqa_tied", tmp_path)
    base_dir = str(tmp_path / "base_llama_gqa_tied_0")  # where tiny_pair saved the transformers model
    spec = jpeft.LoraSpec(r=8, alpha=16.0, target_modules=("q_proj", "v_proj", "down_proj"))
    adapter = _noisy_lora(jpeft.init(spec, config, params, jax.random.key(0)))
    out = str(tmp_path / "adapter")
    jpeft.save_adapter(spec, adapter, out, config, base_model_name_or_path=base_dir)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == base_dir
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(torch_logits(loaded), jax_logits(config, jpeft.bind(params, spec, adapter))) <= TOL


def _noisy_lora(adapter):
    """Non-zero B factors (init leaves them zero), so that the adapter changes the logits."""
    leaves, treedef = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
