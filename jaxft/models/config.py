"""Model configuration: one frozen dataclass for the Llama family, translated from and to HF `config.json`.

`from_hf(dict)` reads transformers 4.x configs (top-level `rope_theta`, `rope_scaling`, Qwen2's
`use_sliding_window`) and 5.x configs (`rope_parameters`, Qwen2's `layer_types`). Any field that changes the math and
is not implemented is refused with an error naming the field (penzai's `bad_attributes` idea): a silent mismatch with
transformers is the worst outcome. `to_hf(config)` writes a dict that transformers 4.x and 5.x both read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from jaxft.errors import UnsupportedConfigError  # re-exported

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as transformers defines it (`default`, `linear`, `llama3`)."""

    rope_type: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family causal LM (Llama 2/3.x, Mistral, Qwen2, SmolLM)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: Literal["llama", "mistral", "qwen2"] = "llama"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Sliding-window attention is not implemented: a window is accepted only when it is at least the sequence length
    # (then it changes nothing); see `check_sequence_length`.
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise UnsupportedConfigError(f"{name}={getattr(self, name)} must be positive")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (1 = MHA, num_attention_heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def check_sequence_length(self, seq_len: int, where: str = "sequence length") -> None:
        """Refuse a sequence length the model (or jaxft's implementation of it) does not support."""
        if self.sliding_window is not None and seq_len > self.sliding_window:
            raise UnsupportedConfigError(
                f"{where} {seq_len} exceeds the model's sliding_window={self.sliding_window}; sliding-window "
                f"attention is not implemented: use sequences of at most {self.sliding_window} tokens"
            )
        limit = self.max_position_embeddings
        if self.rope_scaling.rope_type == "llama3":
            limit = max(limit, int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor))
        if seq_len > limit:
            raise UnsupportedConfigError(
                f"{where} {seq_len} exceeds the model's max_position_embeddings={limit}; use at most {limit} tokens"
            )

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


# Fields of HF configs that carry no math for jaxft (bookkeeping, generation defaults, runtime switches).
_IGNORED = {
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path", "dtype", "torch_dtype",
    "use_cache", "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "pretraining_tp", "tokenizer_class", "_attn_implementation",
    "_attn_implementation_autoset", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
    "max_window_layers", "use_sliding_window", "layer_types", "sliding_window", "rope_theta", "rope_scaling",
    "rope_parameters", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout", "head_dim",
    "tie_word_embeddings", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "use_bfloat16",
    "torchscript", "pruned_heads", "finetuning_task", "task_specific_params", "tf_legacy_loss", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "decoder_start_token_id", "sep_token_id", "prefix",
    "output_scores", "return_dict_in_generate", "quantization_config", "keys_to_ignore_at_inference", "embd_pdrop",
    "resid_pdrop", "mlp_only_layers", "unsloth_version", "unsloth_fixed", "num_logits_to_keep", "logits_to_keep",
}


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedConfigError("rope_parameters: per-layer-type RoPE parameters are not supported")
    # transformers 5.x lets `rope_scaling` win over `rope_parameters` when both are present.
    rope = dict(scaling or params or {})
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedConfigError("partial_rotary_factor != 1.0 is not supported")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=float(rope["factor"]))
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", d.get("max_position_embeddings", 8192))
            ),
        )
    raise UnsupportedConfigError(
        f"rope_scaling type '{rope_type}' is not supported (supported: default, linear, llama3)"
    )


def _sliding_window_from_hf(d: Mapping[str, Any], model_type: str) -> int | None:
    window = d.get("sliding_window")
    if window is None:
        return None
    if model_type != "qwen2":
        return int(window)
    # Qwen2 (4.x and 5.x): the window applies only with use_sliding_window, and only to the layers that
    # layer_types marks (5.x) or to layers >= max_window_layers (4.x).
    if not d.get("use_sliding_window", False):
        return None
    layer_types = d.get("layer_types")
    n = int(d["num_hidden_layers"])
    if layer_types is None:
        layer_types = ["sliding_attention" if i >= int(d.get("max_window_layers", 28)) else "full_attention" for i in range(n)]
    return int(window) if "sliding_attention" in layer_types else None


def from_hf(d: Mapping[str, Any]) -> LlamaConfig:
    """Translate an HF `config.json` dict into a `LlamaConfig`, refusing what jaxft does not implement."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if archs and archs[0] not in ARCHITECTURES:
        raise UnsupportedConfigError(
            f"architecture '{archs[0]}' is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    if model_type not in MODEL_TYPES:
        raise UnsupportedConfigError(
            f"model_type '{model_type}' is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    for key in d:
        if key not in _IGNORED:
            raise UnsupportedConfigError(f"config field '{key}' is not implemented by jaxft; refusing to guess its meaning")
    if d.get("hidden_act", "silu") != "silu":
        raise UnsupportedConfigError(f"hidden_act '{d['hidden_act']}' is not supported (only silu)")
    if float(d.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise UnsupportedConfigError("attention_dropout != 0 is not implemented; set it to 0.0")
    theta, scaling = _rope_from_hf(d)
    hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
    attention_bias = bool(d.get("attention_bias", False))
    if model_type == "mistral" and attention_bias:
        raise UnsupportedConfigError("attention_bias=true is not part of Mistral's architecture")
    qkv_bias = True if model_type == "qwen2" else attention_bias
    eos = d.get("eos_token_id")
    return LlamaConfig(
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or hidden // heads),
        model_type=model_type,
        max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=attention_bias if model_type == "llama" else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=_sliding_window_from_hf(d, model_type),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
        initializer_range=float(d.get("initializer_range", 0.02)),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
    )


def to_hf(config: LlamaConfig) -> dict[str, Any]:
    """An HF `config.json` dict for `config`, readable by transformers 4.x (rope_theta/rope_scaling) and 5.x
    (rope_parameters, layer_types)."""
    c = config
    if c.model_type == "qwen2" and (c.o_bias or c.mlp_bias or not c.qkv_bias):
        raise UnsupportedConfigError("Qwen2 has q/k/v biases and no o/mlp biases; this config cannot be written as qwen2")
    if c.model_type == "mistral" and (c.qkv_bias or c.o_bias or c.mlp_bias):
        raise UnsupportedConfigError("Mistral has no biases; this config cannot be written as mistral")
    if c.model_type == "llama" and c.qkv_bias != c.o_bias:
        raise UnsupportedConfigError("Llama's attention_bias covers q, k, v and o together")
    rope: dict[str, Any] = {"rope_type": c.rope_scaling.rope_type, "rope_theta": c.rope_theta}
    if c.rope_scaling.rope_type == "linear":
        rope["factor"] = c.rope_scaling.factor
    elif c.rope_scaling.rope_type == "llama3":
        rope.update(
            factor=c.rope_scaling.factor,
            low_freq_factor=c.rope_scaling.low_freq_factor,
            high_freq_factor=c.rope_scaling.high_freq_factor,
            original_max_position_embeddings=c.rope_scaling.original_max_position_embeddings,
        )
    scaling = None if c.rope_scaling.rope_type == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None:
        scaling["type"] = scaling["rope_type"]
    out: dict[str, Any] = {
        "architectures": [MODEL_TYPES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": c.initializer_range,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.torch_dtype,
        "use_cache": True,
    }
    if c.model_type == "llama":
        out["attention_bias"] = c.qkv_bias
        out["mlp_bias"] = c.mlp_bias
    if c.model_type in ("mistral", "qwen2"):
        out["sliding_window"] = c.sliding_window
    if c.model_type == "qwen2":
        out["use_sliding_window"] = c.sliding_window is not None
        out["max_window_layers"] = 0 if c.sliding_window is not None else c.num_hidden_layers
        kind = "sliding_attention" if c.sliding_window is not None else "full_attention"
        out["layer_types"] = [kind] * c.num_hidden_layers
    return out
