"""peft `adapter_config.json` fields jaxft reads but does not implement: a file with any value but the neutral one is
refused by name rather than loaded with different math."""

from __future__ import annotations

from typing import Any

from jaxft.errors import ConfigError

# neutral values of the fields jaxft does not implement (None: any value is fine)
NEUTRAL = {
    "bias": ("none",), "fan_in_fan_out": (False,), "lora_bias": (False,), "layer_replication": (None, []),
    "target_parameters": (None, []), "trainable_token_indices": (None, {}, []), "alora_invocation_tokens": (None,),
    "use_qalora": (False,), "megatron_config": (None,), "loftq_config": (None, {}), "eva_config": (None,),
    "corda_config": (None,), "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,), "lora_ga_config": (None,), "runtime_config": None,
    "layers_pattern": (None, "layers", ["layers"], "", []), "num_transformer_submodules": (1, None),
}
IGNORED = {"peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
           "auto_mapping", "megatron_core", "qalora_group_size", "init_ia3_weights", "tokenizer_name_or_path",
           "tokenizer_kwargs", "prompt_tuning_init", "prompt_tuning_init_text", "num_layers", "num_attention_heads",
           "token_dim", "encoder_hidden_size", "prefix_projection", "init_weights", "ensure_weight_tying"}


def refuse_options(cfg: dict, known: set[str], where: str) -> None:
    """Refuse a field outside `known` (and the ignored bookkeeping fields) that holds a non-neutral value."""
    for key, value in cfg.items():
        if key in known or key in IGNORED:
            continue
        neutral = NEUTRAL.get(key, (None, False, [], {}, ""))
        if neutral is not None and value not in neutral:
            raise ConfigError(f"{where}: option {key}={value!r} is not supported by jaxft (it changes the math); "
                              "only plain LoRA/DoRA, IA3, prompt and prefix tuning adapters load")


def check_task(cfg: dict, where: str) -> None:
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ConfigError(f"{where}: task_type {cfg['task_type']!r} is not supported (only CAUSAL_LM)")


def listify(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)
