"""Model configuration: one frozen dataclass for the Llama family, translated from and to HF `config.json`.

`from_hf(dict)` reads transformers 4.x configs (top-level `rope_theta`, `rope_scaling`, Qwen2's
`use_sliding_window` / `max_window_layers`) and 5.x configs (`rope_parameters`, Qwen2's `layer_types`). Any field
that changes the math and is not implemented is refused with an error naming the field (penzai's `bad_attributes`
idea): a silent mismatch with transformers is the worst outcome. `to_hf(config)` writes a dict that transformers 4.x
and 5.x both read.

Sliding windows follow what transformers' models compute (5.x, eager attention): Mistral applies `sliding_window` to
every layer (its modelling code ignores `layer_types`); Qwen2 applies it to the layers `layer_types` marks
`"sliding_attention"`, which transformers derives from `max_window_layers` when absent (layers `i >=
max_window_layers`), and only when `use_sliding_window` is true; Llama has no window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from jaxft.errors import ConfigError, JaxftError, UnsupportedConfigError  # UnsupportedConfigError re-exported
from jaxft.ops.rope import RopeScaling  # re-exported: the config's field type

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
FULL, SLIDING = "full_attention", "sliding_attention"
LayerType = Literal["full_attention", "sliding_attention"]


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
    # A query attends to at most `sliding_window` keys: itself and the `sliding_window - 1` before it (transformers'
    # `kv_idx > q_idx - sliding_window`), in the layers `layer_types` marks "sliding_attention". `layer_types=None`
    # means every layer is alike: all sliding when `sliding_window` is set, all full otherwise. The constructor
    # keeps one spelling per model: a `layer_types` of one kind becomes None, and `sliding_window` becomes None when
    # no layer slides.
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
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
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UnsupportedConfigError(f"sliding_window={self.sliding_window} must be positive (or None)")
        types = self.layer_types
        if types is not None:
            types = tuple(types)
            if len(types) != self.num_hidden_layers or any(t not in (FULL, SLIDING) for t in types):
                raise UnsupportedConfigError(
                    f"layer_types must list '{FULL}' or '{SLIDING}' for each of the {self.num_hidden_layers} "
                    f"layers, got {list(types)}")
            if SLIDING in types and self.sliding_window is None:
                raise UnsupportedConfigError("layer_types marks sliding_attention layers but sliding_window is None; "
                                             "set sliding_window")
            if len(set(types)) == 1:
                if types[0] == FULL:
                    object.__setattr__(self, "sliding_window", None)
                types = None
            object.__setattr__(self, "layer_types", types)

    @property
    def layer_windows(self) -> tuple[int | None, ...]:
        """The attention window of each layer (None: full causal attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_hidden_layers
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (1 = MHA, num_attention_heads = MQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    def check_sequence_length(self, seq_len: int, where: str = "sequence length") -> None:
        """Refuse a sequence length the model does not support."""
        limit = self.max_position_embeddings
        if self.rope_scaling.rope_type == "llama3":
            limit = max(limit, int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor))
        if seq_len > limit:
            raise UnsupportedConfigError(
                f"{where} {seq_len} exceeds the model's max_position_embeddings={limit}; use at most {limit} tokens"
            )

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with `changes`. Changing `num_hidden_layers` alone to fewer layers keeps the first layers'
        `layer_types` (the model cut to its first layers)."""
        n = changes.get("num_hidden_layers", self.num_hidden_layers)
        if "layer_types" not in changes and self.layer_types is not None and n <= len(self.layer_types):
            changes["layer_types"] = self.layer_types[:n]
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


_REQUIRED = object()


def _number(d: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED, section: str = "") -> Any:
    """`kind(d[key])` (int or float), or `default` when the key is absent or null; a missing required field or a
    value that is not a number raises ConfigError naming the field."""
    value = d.get(key)
    name = f"{section}.{key}" if section else key
    what = "an integer" if kind is int else "a number"
    if value is None:
        if default is _REQUIRED:
            state = "missing" if key not in d else "null"
            raise ConfigError(f"required field '{name}' is {state}; add it ({what}) as the model's original "
                              "config.json has it")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"field '{name}' must be {what}, got {value!r}")
    return kind(value)


def _rope_from_hf(d: Mapping[str, Any]) -> tuple[float, RopeScaling]:
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if isinstance(params, Mapping) and any(isinstance(v, Mapping) for v in params.values()):
        raise UnsupportedConfigError("rope_parameters: per-layer-type RoPE parameters are not supported")
    # transformers 5.x lets `rope_scaling` win over `rope_parameters` when both are present.
    rope = dict(scaling or params or {})
    section = "rope_scaling" if scaling else "rope_parameters"
    theta = _number(rope, "rope_theta", float, _number(d, "rope_theta", float, 10000.0), section)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedConfigError("partial_rotary_factor != 1.0 is not supported")
    if rope_type == "default":
        return theta, RopeScaling()
    if rope_type == "linear":
        return theta, RopeScaling("linear", factor=_number(rope, "factor", float, section=section))
    if rope_type == "llama3":
        return theta, RopeScaling(
            "llama3",
            factor=_number(rope, "factor", float, section=section),
            low_freq_factor=_number(rope, "low_freq_factor", float, section=section),
            high_freq_factor=_number(rope, "high_freq_factor", float, section=section),
            original_max_position_embeddings=_number(
                rope, "original_max_position_embeddings", int, _number(d, "max_position_embeddings", int, 8192),
                section),
        )
    raise UnsupportedConfigError(
        f"rope_scaling type '{rope_type}' is not supported (supported: default, linear, llama3)"
    )


# transformers 5 renames a few legacy layer-type names on load (configuration_utils._LEGACY_LAYER_TYPE_REMAP).
_LEGACY_LAYER_TYPES = {"attention": FULL}


def _windows_from_hf(d: Mapping[str, Any], model_type: str, n_layers: int) -> tuple[int | None, tuple | None]:
    """`(sliding_window, layer_types)` as transformers' model of `model_type` applies them."""
    window = _number(d, "sliding_window", int, None)
    given = d.get("layer_types")
    if given is not None:
        given = tuple(_LEGACY_LAYER_TYPES.get(t, t) for t in given)
    if model_type == "qwen2":
        # Qwen2Config drops the window unless use_sliding_window, and derives layer_types from max_window_layers.
        if not d.get("use_sliding_window", False):
            window = None
        if given is None:
            first = _number(d, "max_window_layers", int, 28)
            given = tuple(SLIDING if window is not None and i >= first else FULL for i in range(n_layers))
        if SLIDING in given and window is None:
            raise UnsupportedConfigError(
                "layer_types marks sliding_attention layers but use_sliding_window is false or sliding_window is "
                "null (transformers' Qwen2 fails on it): set use_sliding_window and sliding_window, or mark every "
                "layer full_attention")
        return window, given
    # Mistral applies its window to every layer (MistralModel ignores layer_types); Llama has none.
    if model_type == "llama" and window is not None:
        raise UnsupportedConfigError(
            f"sliding_window={window} on a llama config: transformers' Llama ignores it, so the model would not be "
            "the one intended; remove the field, or use model_type mistral for a windowed model")
    kind = SLIDING if window is not None else FULL
    if given is not None and any(t != kind for t in given):
        raise UnsupportedConfigError(
            f"layer_types {list(given)}: transformers' {model_type} model applies "
            f"{'sliding_window to every layer' if window else 'full attention to every layer'} and ignores "
            "layer_types; remove layer_types (or use model_type qwen2 for per-layer windows)")
    return window, None


def from_hf(d: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
    """Translate an HF `config.json` dict into a `LlamaConfig`, refusing what jaxft does not implement.

    Errors are one line starting with `f"{source}: "` (`source` names the file the dict came from):
    `ConfigError` for a missing required field or a value of the wrong type, `UnsupportedConfigError` for math
    jaxft does not implement."""
    try:
        return _from_hf(d)
    except JaxftError as e:
        raise type(e)(f"{source}: {e}") from None


def _from_hf(d: Mapping[str, Any]) -> LlamaConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected a JSON object of model fields, got {type(d).__name__}")
    if d.get("model_type") is None:
        raise ConfigError(f"required field 'model_type' is missing; add it (one of {', '.join(MODEL_TYPES)})")
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
    if _number(d, "attention_dropout", float, 0.0) != 0.0:
        raise UnsupportedConfigError("attention_dropout != 0 is not implemented; set it to 0.0")
    theta, scaling = _rope_from_hf(d)
    n_layers = _number(d, "num_hidden_layers", int)
    window, layer_types = _windows_from_hf(d, model_type, n_layers)
    hidden, heads = _number(d, "hidden_size", int), _number(d, "num_attention_heads", int)
    if heads <= 0:
        raise ConfigError(f"num_attention_heads={heads} must be positive")
    attention_bias = bool(d.get("attention_bias", False))
    if model_type == "mistral" and attention_bias:
        raise UnsupportedConfigError("attention_bias=true is not part of Mistral's architecture")
    qkv_bias = True if model_type == "qwen2" else attention_bias
    eos = d.get("eos_token_id")
    return LlamaConfig(
        vocab_size=_number(d, "vocab_size", int),
        hidden_size=hidden,
        intermediate_size=_number(d, "intermediate_size", int),
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        num_key_value_heads=_number(d, "num_key_value_heads", int, heads),
        head_dim=_number(d, "head_dim", int, hidden // heads),
        model_type=model_type,
        max_position_embeddings=_number(d, "max_position_embeddings", int, 2048),
        rms_norm_eps=_number(d, "rms_norm_eps", float, 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=attention_bias if model_type == "llama" else False,
        mlp_bias=bool(d.get("mlp_bias", False)) if model_type == "llama" else False,
        sliding_window=window,
        layer_types=layer_types,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=d.get("pad_token_id"),
        initializer_range=_number(d, "initializer_range", float, 0.02),
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32"),
    )


def to_hf(config: LlamaConfig) -> dict[str, Any]:
    """An HF `config.json` dict for `config`, readable by transformers 4.x (rope_theta/rope_scaling,
    max_window_layers) and 5.x (rope_parameters, layer_types)."""
    c = config
    if c.model_type == "qwen2" and (c.o_bias or c.mlp_bias or not c.qkv_bias):
        raise UnsupportedConfigError("Qwen2 has q/k/v biases and no o/mlp biases; this config cannot be written as qwen2")
    if c.model_type == "mistral" and (c.qkv_bias or c.o_bias or c.mlp_bias):
        raise UnsupportedConfigError("Mistral has no biases; this config cannot be written as mistral")
    if c.model_type == "llama" and c.qkv_bias != c.o_bias:
        raise UnsupportedConfigError("Llama's attention_bias covers q, k, v and o together")
    if c.model_type == "llama" and c.sliding_window is not None:
        raise UnsupportedConfigError("Llama has no sliding-window attention; this config cannot be written as llama "
                                     "(use mistral or qwen2)")
    if c.model_type == "mistral" and c.layer_types is not None:
        raise UnsupportedConfigError("Mistral applies its window to every layer; per-layer windows cannot be "
                                     "written as mistral (use qwen2)")
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
        # layer_types is what transformers >= 4.53 and 5.x read; older 4.x read max_window_layers (sliding from that
        # layer on), exact when the full layers come first, as in every Qwen2 checkpoint.
        types = [SLIDING if w is not None else FULL for w in c.layer_windows]
        out["use_sliding_window"] = c.sliding_window is not None
        out["max_window_layers"] = types.index(SLIDING) if SLIDING in types else c.num_hidden_layers
        out["layer_types"] = types
    return out
