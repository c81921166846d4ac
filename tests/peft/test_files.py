"""Adapter files a user wrote or broke: `save_adapter` never replaces a directory's files unasked, and a file that is
empty, not JSON, lacks a field, is missing, or was made for another model is refused with a `jaxft` error naming the
file (and the line and column, the tensor and both shapes, where there is one) before anything is computed."""

from __future__ import annotations

import json
import os
import warnings

import jax
import pytest

import jaxft
from jaxft import peft as jpeft
from jaxft.errors import FileFormatError, JaxftError
from tiny_tree import CONFIG, PARAMS

LORA = jpeft.LoraSpec(r=8, target_modules=("q_proj", "v_proj"))  # rank 8: vLLM serves it, no warning


def _saved(tmp_path, spec=LORA, config=CONFIG, params=PARAMS, name="a"):
    adapter = jpeft.init(spec, config, params, jax.random.key(0))
    d = str(tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Houlsby / BitFit: "vLLM will not serve", not what these tests check
        jpeft.save_adapter(spec, adapter, d, config)
    return d, adapter


def test_save_into_a_non_empty_directory_needs_overwrite(tmp_path):
    d, adapter = _saved(tmp_path)
    other = jpeft.init(LORA, CONFIG, PARAMS, jax.random.key(5))
    with pytest.raises(FileExistsError, match=rf"^{d}: exists and is not empty; .* pass overwrite=True$"):
        jpeft.save_adapter(LORA, other, d, CONFIG)
    _, kept = jpeft.load_adapter(d, CONFIG)
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(adapter)))
    # a directory holding only a user's own file is not empty either
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jpeft.save_adapter(LORA, other, str(tmp_path / "notes"), CONFIG)
    jpeft.save_adapter(LORA, other, d, CONFIG, overwrite=True)
    _, replaced = jpeft.load_adapter(d, CONFIG)
    assert all((a == b).all() for a, b in zip(jax.tree.leaves(replaced), jax.tree.leaves(other)))
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]
    jpeft.save_adapter(LORA, other, str(tmp_path / "empty_ok"), CONFIG)  # new or empty directories need nothing


BIAS_CONFIG = CONFIG.replace(qkv_bias=True)
BIAS_PARAMS = jaxft.init_params(BIAS_CONFIG, jax.random.key(0))


@pytest.mark.parametrize("spec,tensor", [
    (jpeft.HoulsbySpec(bottleneck=4), r"model\.layers\.mlp\.down_proj\.kernel\.down' has shape \(3, 32, 4\), "
                                      r"the model expects \(3, 48, 4\)"),
    (jpeft.BitFitSpec(), r"model\.layers\.self_attn\.k_proj\.bias' has shape \(3, 16\), the model expects "
                         r"\(3, 24\)"),
])
def test_own_format_adapters_are_shape_checked_at_load(spec, tensor, tmp_path):
    """Houlsby and BitFit files (jaxft's own format) made for hidden 32 do not load on hidden 48."""
    config = BIAS_CONFIG if isinstance(spec, jpeft.BitFitSpec) else CONFIG
    params = BIAS_PARAMS if isinstance(spec, jpeft.BitFitSpec) else PARAMS
    d, _ = _saved(tmp_path, spec, config, params)
    assert jpeft.load_adapter(d, config)[0] == spec
    wider = config.replace(hidden_size=48, head_dim=12)
    with pytest.raises(FileFormatError, match=rf"^{d}/adapter_model\.safetensors: tensor '{tensor}"):
        jpeft.load_adapter(d, wider)
    with pytest.raises(FileFormatError, match=r"the model expects \(4, "):  # a model with one layer more
        jpeft.load_adapter(d, config.replace(num_hidden_layers=4))


def _write_config(tmp_path, text: str) -> str:
    d, _ = _saved(tmp_path)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        f.write(text)
    return d


@pytest.mark.parametrize("text,message", [
    ("", r"adapter_config\.json: the file is empty"),
    ("  \n\n", r"adapter_config\.json: the file is empty"),
    ('{\n  "peft_type": "LORA",\n  r: 8\n}', r"adapter_config\.json: line 3 column 3: not valid JSON \(Expecting "
                                              r"property name enclosed in double quotes\)"),
    ('{"peft_type": "LORA", "r": 8,}', r"adapter_config\.json: line 1 column 30: not valid JSON"),
    ('{"peft_type": "LORA"}\n\tx', r"adapter_config\.json: line 2 column 2: not valid JSON \(Extra data\)"),
    ('["LORA"]', r"adapter_config\.json: expected a JSON object of adapter options, got a list"),
    ('{"r": 8, "lora_alpha": 16}', r"adapter_config\.json: missing required field 'peft_type'"),
    ('{"peft_type": "PROMPT_TUNING"}', r"adapter_config\.json: missing required field 'num_virtual_tokens'"),
])
def test_broken_adapter_config_names_file_line_and_column(text, message, tmp_path):
    d = _write_config(tmp_path, text)
    with pytest.raises(FileFormatError, match=f"^{d}/{message}") as e:
        jpeft.load_adapter(d, CONFIG)
    assert "\n" not in str(e.value) and isinstance(e.value, JaxftError)


def test_missing_files_are_file_format_errors(tmp_path):
    d, _ = _saved(tmp_path)
    os.remove(os.path.join(d, "adapter_model.safetensors"))
    with pytest.raises(FileFormatError, match=rf"^{d}: no adapter_model\.safetensors; the adapter's weights are "
                                              "missing"):
        jpeft.load_adapter(d, CONFIG)
    with open(os.path.join(d, "adapter_model.safetensors"), "w") as f:
        f.write("not safetensors")
    with pytest.raises(FileFormatError, match=r"adapter_model\.safetensors: unreadable safetensors file"):
        jpeft.load_adapter(d, CONFIG)
    os.remove(os.path.join(d, "adapter_config.json"))
    with pytest.raises(FileFormatError, match=r"no adapter_config\.json; not an adapter directory"):
        jpeft.load_adapter(d, CONFIG)


def test_base_model_name_or_path_is_written_as_given(tmp_path):
    spec = jpeft.IA3Spec()
    adapter = jpeft.init(spec, CONFIG, PARAMS, jax.random.key(0))
    for name, value in (("hub", "HuggingFaceTB/SmolLM2-135M-Instruct"), ("none", None)):
        with pytest.warns(UserWarning, match="IA3: vLLM serves plain LoRA only"):
            jpeft.save_adapter(spec, adapter, str(tmp_path / name), CONFIG, base_model_name_or_path=value)
        with open(tmp_path / name / "adapter_config.json") as f:
            assert json.load(f)["base_model_name_or_path"] == value
