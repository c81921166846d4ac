"""Config translation: transformers 4.x and 5.x formats in, both out; unsupported math refused by name."""

import json

import pytest

from jaxft.errors import ConfigError
from jaxft.models.config import LlamaConfig, RopeScaling, UnsupportedConfigError, from_hf, to_hf

BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=100, hidden_size=32,
            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)


def test_reads_4x_and_5x_rope_formats():
    v4 = dict(BASE, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    v5 = dict(BASE, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    a, b = from_hf(v4), from_hf(v5)
    assert a == b
    assert a.rope_theta == 500000.0 and a.rope_scaling.rope_type == "llama3" and a.rope_scaling.factor == 8.0
    old_style = dict(BASE, rope_scaling={"type": "linear", "factor": 2.0})
    assert from_hf(old_style).rope_scaling == RopeScaling("linear", factor=2.0)


@pytest.mark.parametrize("cfg", [
    dict(BASE),
    dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    dict(BASE, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096),
    dict(BASE, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}),
    dict(BASE, attention_bias=True, mlp_bias=True, head_dim=16),
])
def test_written_config_reads_back_in_transformers_and_jaxft(cfg, tmp_path):
    """to_hf writes a config transformers reads (both rope fields present) and that translates back unchanged."""
    from transformers import AutoConfig

    config = from_hf(cfg)
    d = to_hf(config)
    assert "rope_parameters" in d and "rope_theta" in d  # 5.x and 4.x fields
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert from_hf(hf.to_dict()) == config
    assert from_hf(d) == config


QWEN2 = dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_hidden_layers=4, sliding_window=64)
MISTRAL = dict(BASE, model_type="mistral", architectures=["MistralForCausalLM"])
F, S = "full_attention", "sliding_attention"


def test_qwen2_sliding_window_4x_and_5x():
    """Windows per layer as transformers 5's Qwen2Config derives them, from 4.x and 5.x fields."""
    assert from_hf(dict(QWEN2, use_sliding_window=False)).layer_windows == (None,) * 4
    assert from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=0)).layer_windows == (64,) * 4
    assert from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=4)).layer_windows == (None,) * 4
    four = from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=2))
    assert four.layer_windows == (None, None, 64, 64) and four.layer_types == (F, F, S, S)
    five = from_hf(dict(QWEN2, use_sliding_window=True, layer_types=[F, F, S, S]))
    assert five == four
    assert from_hf(dict(QWEN2, use_sliding_window=True, max_window_layers=2)).sliding_window == 64
    # max_window_layers defaults to 28, as in transformers: no layer of a 4-layer model slides.
    assert from_hf(dict(QWEN2, use_sliding_window=True)).layer_windows == (None,) * 4


def test_one_spelling_per_model():
    """Uniform layer_types collapse (all sliding -> None; all full -> no window), so equal models compare equal."""
    c = LlamaConfig(**{k: BASE[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads")}, head_dim=8,
                    model_type="qwen2", qkv_bias=True, sliding_window=64, layer_types=(S, S))
    assert c.layer_types is None and c.sliding_window == 64
    assert c.replace(layer_types=(F, F)).sliding_window is None
    assert c.replace(layer_types=(F, S)).layer_windows == (None, 64)
    assert c.replace(layer_types=(F, S)).replace(num_hidden_layers=1).layer_windows == (None,)  # cut to 1 layer
    with pytest.raises(UnsupportedConfigError, match="layer_types must list"):
        c.replace(layer_types=(F,))
    with pytest.raises(UnsupportedConfigError, match="sliding_window is None"):
        c.replace(sliding_window=None, layer_types=(F, S))


@pytest.mark.parametrize("cfg", [
    dict(MISTRAL, sliding_window=16),
    dict(QWEN2, use_sliding_window=True, max_window_layers=2),
    dict(QWEN2, use_sliding_window=True, layer_types=[S, F, S, F]),
    dict(QWEN2, use_sliding_window=True, max_window_layers=0),
    dict(QWEN2, use_sliding_window=False),
], ids=["mistral", "qwen2_4x_mixed", "qwen2_5x_alternating", "qwen2_all_sliding", "qwen2_none"])
def test_window_round_trip_through_transformers(cfg, tmp_path):
    """from_hf(to_hf(c)) == c, and transformers' config class reads to_hf's output with the same windows."""
    from transformers import AutoConfig

    config = from_hf(cfg)
    d = to_hf(config)
    assert from_hf(d) == config
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert from_hf(hf.to_dict()) == config
    if config.model_type == "qwen2":
        hf_windows = tuple(hf.sliding_window if t == S else None for t in hf.layer_types)
    else:
        hf_windows = (hf.sliding_window,) * hf.num_hidden_layers
    assert hf_windows == config.layer_windows


@pytest.mark.parametrize("cfg, field", [
    (dict(MISTRAL, sliding_window=16, layer_types=[F, S]), "layer_types"),
    (dict(BASE, sliding_window=16), "sliding_window=16 on a llama config"),
    (dict(QWEN2, use_sliding_window=False, layer_types=[F, F, S, S]), "use_sliding_window is false"),
])
def test_windows_transformers_would_not_apply_are_refused(cfg, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        from_hf(cfg)


@pytest.mark.parametrize("change, field", [
    (dict(architectures=["GPT2LMHeadModel"]), "GPT2LMHeadModel"),
    (dict(model_type="gemma"), "gemma"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "dynamic"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(some_new_field=1), "some_new_field"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
])
def test_unsupported_fields_are_refused_by_name(change, field):
    with pytest.raises(UnsupportedConfigError, match=field) as e:
        from_hf(dict(BASE, **change))
    assert "\n" not in str(e.value)


def test_sequence_length_checks():
    c = from_hf(dict(BASE, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=128))
    c.check_sequence_length(256)  # a window no longer limits the length (sliding-window attention is implemented)
    with pytest.raises(UnsupportedConfigError, match="max_position_embeddings=256"):
        from_hf(BASE).check_sequence_length(300)


def test_config_is_hashable_and_frozen():
    c = from_hf(BASE)
    assert isinstance(hash(c), int)
    with pytest.raises(Exception):
        c.hidden_size = 3  # type: ignore[misc]
    assert isinstance(c, LlamaConfig) and c.num_groups == 2


REQUIRED = ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads"]
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


@pytest.mark.parametrize("field", REQUIRED)
def test_missing_required_field_is_a_config_error_naming_file_and_field(field):
    d = {k: v for k, v in BASE.items() if k != field}
    with pytest.raises(ConfigError) as e:
        from_hf(d, source="/models/x/config.json")
    msg = str(e.value)
    assert msg.startswith("/models/x/config.json: ") and f"'{field}'" in msg and "\n" not in msg
    assert "missing" in msg and "add it" in msg


@pytest.mark.parametrize("rope, field", [
    ({k: v for k, v in LLAMA3.items() if k != "factor"}, "rope_scaling.factor"),
    ({k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}, "rope_scaling.low_freq_factor"),
    ({k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}, "rope_scaling.high_freq_factor"),
    ({"rope_type": "linear"}, "rope_scaling.factor"),
])
def test_missing_rope_field_is_a_config_error(rope, field):
    with pytest.raises(ConfigError, match=f"^config.json: required field '{field}' is missing"):
        from_hf(dict(BASE, rope_scaling=rope))
    v5 = dict(rope, rope_theta=10000.0)
    with pytest.raises(ConfigError, match=field.replace("rope_scaling", "rope_parameters")):
        from_hf(dict(BASE, rope_parameters=v5))


@pytest.mark.parametrize("change, field", [
    (dict(hidden_size="32"), "hidden_size"), (dict(num_hidden_layers=2.5), "num_hidden_layers"),
    (dict(rms_norm_eps=None, hidden_size=True), "hidden_size"), (dict(sliding_window="x", model_type="mistral",
                                                                      architectures=["MistralForCausalLM"]),
                                                                 "sliding_window"),
])
def test_wrong_type_is_a_config_error(change, field):
    with pytest.raises(ConfigError, match=f"^config.json: field '{field}' must be"):
        from_hf(dict(BASE, **change))


def test_unsupported_errors_name_the_source_too():
    with pytest.raises(UnsupportedConfigError, match="^a/config.json: hidden_act"):
        from_hf(dict(BASE, hidden_act="gelu"), source="a/config.json")
    with pytest.raises(ConfigError, match="^config.json: expected a JSON object"):
        from_hf([1, 2])
