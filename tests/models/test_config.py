"""Config translation: transformers 4.x and 5.x formats in, both out; unsupported math refused by name."""

import json

import pytest

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


def test_qwen2_sliding_window_4x_and_5x():
    q = dict(BASE, model_type="qwen2", architectures=["Qwen2ForCausalLM"], sliding_window=64)
    assert from_hf(dict(q, use_sliding_window=False)).sliding_window is None
    assert from_hf(dict(q, use_sliding_window=True, max_window_layers=0)).sliding_window == 64
    assert from_hf(dict(q, use_sliding_window=True, max_window_layers=2)).sliding_window is None  # no sliding layer
    five = dict(q, use_sliding_window=True, layer_types=["full_attention", "sliding_attention"])
    assert from_hf(five).sliding_window == 64


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
    c.check_sequence_length(128)
    with pytest.raises(UnsupportedConfigError, match="sliding_window=128"):
        c.check_sequence_length(129)
    with pytest.raises(UnsupportedConfigError, match="max_position_embeddings=256"):
        from_hf(BASE).check_sequence_length(300)


def test_config_is_hashable_and_frozen():
    c = from_hf(BASE)
    assert isinstance(hash(c), int)
    with pytest.raises(Exception):
        c.hidden_size = 3  # type: ignore[misc]
    assert isinstance(c, LlamaConfig) and c.num_groups == 2
