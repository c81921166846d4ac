"""Adapters in the peft library's format: `adapter_config.json` + `adapter_model.safetensors`.

Tensor keys are peft's: `base_model.model.<module name>.<tensor>` with

    LoRA    lora_A.weight [r, in], lora_B.weight [out, r]       (per layer, the layer's own rank)
    DoRA    the same + lora_magnitude_vector [out]              (no `.weight`)
    IA3     ia3_l [out, 1], or [1, in] for feedforward targets
    prompt tuning   prompt_embeddings [P, D]
    prefix tuning   prompt_embeddings [P, L * 2 * K * hd]        (per virtual token: layer, key|value, kv head, dim)
    modules_to_save base_model.model.lm_head.weight [V, D], base_model.model.model.embed_tokens.weight [V, D]

Houlsby and BitFit adapters have no peft equivalent: they go out in jaxft's own format (same two file names,
`peft_type` JAXFT_HOULSBY / JAXFT_BITFIT, tensor keys = dotted adapter-tree paths), which peft refuses to load.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params
from jaxft.peft.serve import vllm_warnings
from jaxft.peft.specs import (BitFitSpec, DoraSpec, HoulsbySpec, IA3Spec, LoraSpec, PrefixTuningSpec,
                              PromptTuningSpec)
from jaxft.peft.targets import get_path, iter_instances, plan, set_path
from jaxft.peft.tree import init
from jaxft.errors import ConfigError, FileFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_JAXFT_TYPES = {"JAXFT_HOULSBY": HoulsbySpec, "JAXFT_BITFIT": BitFitSpec}
_SAVED_KEYS = {("model", "embed_tokens", "weight"): ("model.embed_tokens.weight", False),
               ("lm_head", "kernel"): ("lm_head.weight", True)}
# peft config fields jaxft reads (per peft_type), and the neutral values of those it does not implement: a file
# with any other value is refused by name rather than loaded with different math.
_NEUTRAL = {
    "bias": ("none",), "fan_in_fan_out": (False,), "lora_bias": (False,), "layer_replication": (None, []),
    "target_parameters": (None, []), "trainable_token_indices": (None, {}, []), "alora_invocation_tokens": (None,),
    "use_qalora": (False,), "megatron_config": (None,), "loftq_config": (None, {}), "eva_config": (None,),
    "corda_config": (None,), "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,), "lora_ga_config": (None,), "runtime_config": None,
    "layers_pattern": (None, "layers", ["layers"], "", []), "num_transformer_submodules": (1, None),
}
_IGNORED = {"peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
            "auto_mapping", "megatron_core", "qalora_group_size", "init_ia3_weights", "tokenizer_name_or_path",
            "tokenizer_kwargs", "prompt_tuning_init", "prompt_tuning_init_text", "num_layers", "num_attention_heads",
            "token_dim", "encoder_hidden_size", "prefix_projection", "init_weights", "ensure_weight_tying"}
_LORA_FIELDS = {"r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "use_rslora", "use_dora",
                "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"}
_IA3_FIELDS = {"target_modules", "feedforward_modules", "exclude_modules", "modules_to_save"}


def _refuse_options(cfg: dict, known: set[str], where: str) -> None:
    for key, value in cfg.items():
        if key in known or key in _IGNORED:
            continue
        neutral = _NEUTRAL.get(key, (None, False, [], {}, ""))
        if neutral is not None and value not in neutral:
            raise ConfigError(f"{where}: option {key}={value!r} is not supported by jaxft (it changes the math); "
                              "only plain LoRA/DoRA, IA3, prompt and prefix tuning adapters load")


def _targets(value: Any) -> Any:
    return value if value is None or isinstance(value, str) else tuple(value)


def _spec_from_config(cfg: dict, where: str, tied: bool) -> Any:
    kind = cfg.get("peft_type")
    if kind in _JAXFT_TYPES:
        fields = {f.name for f in dataclasses.fields(_JAXFT_TYPES[kind])}
        return _JAXFT_TYPES[kind](**{k: _targets(v) if k == "target_modules" else v
                                     for k, v in cfg.items() if k in fields})
    if cfg.get("task_type") not in (None, "CAUSAL_LM"):
        raise ConfigError(f"{where}: task_type {cfg['task_type']!r} is not supported (only CAUSAL_LM)")
    if kind == "LORA":
        _refuse_options(cfg, _LORA_FIELDS, where)
        init = cfg.get("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"{where}: init_lora_weights={init!r} is not supported (it rewrites the base weights "
                              "or needs a conversion); only true, false and 'gaussian' adapters load")
        saved = tuple(cfg.get("modules_to_save") or ())
        if tied and any(m.split(".")[-1] in ("embed_tokens", "lm_head") for m in saved):
            if not cfg.get("ensure_weight_tying", False):
                raise ConfigError(f"{where}: modules_to_save {list(saved)} on a model with tied embeddings without "
                                  "ensure_weight_tying=true (peft then unties input and output embeddings, which "
                                  "jaxft's tied model cannot express)")
            saved = ("embed_tokens",)
        spec_cls = DoraSpec if cfg.get("use_dora", False) else LoraSpec
        layers = cfg.get("layers_to_transform")
        return spec_cls(
            r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=_targets(cfg.get("target_modules") or ("q_proj", "v_proj")),
            exclude_modules=_targets(cfg.get("exclude_modules")), use_rslora=bool(cfg.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "kaiming", rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            layers_to_transform=None if layers in (None, []) else ((layers,) if isinstance(layers, int) else layers),
            modules_to_save=tuple(dict.fromkeys(m.split(".")[-1] for m in saved)))
    if kind == "IA3":
        _refuse_options(cfg, _IA3_FIELDS, where)
        return IA3Spec(target_modules=_targets(cfg.get("target_modules") or ("k_proj", "v_proj", "down_proj")),
                       feedforward_modules=_targets(cfg.get("feedforward_modules") or ("down_proj",)),
                       exclude_modules=_targets(cfg.get("exclude_modules")),
                       modules_to_save=tuple(m.split(".")[-1] for m in cfg.get("modules_to_save") or ()))
    if kind in ("PROMPT_TUNING", "PREFIX_TUNING"):
        _refuse_options(cfg, {"num_virtual_tokens", "modules_to_save"}, where)
        if cfg.get("modules_to_save"):
            raise ConfigError(f"{where}: modules_to_save with {kind} is not supported")
        if "num_virtual_tokens" not in cfg:
            raise FileFormatError(f"{where}: missing required field 'num_virtual_tokens' for {kind}; re-save the "
                                  "adapter")
        p = int(cfg["num_virtual_tokens"])
        return PromptTuningSpec(num_virtual_tokens=p) if kind == "PROMPT_TUNING" else PrefixTuningSpec(p)
    raise ConfigError(f"{where}: peft_type {kind!r} is not supported (supported: LORA (incl. DoRA), IA3, "
                      "PROMPT_TUNING, PREFIX_TUNING)")


def read_adapter_config(path: str) -> dict:
    """The JSON object of an `adapter_config.json`; `FileFormatError` naming the file, and the line and column of a
    syntax error, when it is empty, not JSON, not an object, or has no `peft_type`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise FileFormatError(f"{path}: the file is empty; an adapter config is a JSON object with at least "
                              "'peft_type' (re-save the adapter)")
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); fix the file "
                              "or re-save the adapter") from None
    if not isinstance(cfg, dict):
        raise FileFormatError(f"{path}: expected a JSON object of adapter options, got a {type(cfg).__name__}; "
                              "re-save the adapter")
    if "peft_type" not in cfg:
        raise FileFormatError(f"{path}: missing required field 'peft_type' (e.g. \"LORA\"); re-save the adapter "
                              "with peft or jaxft.peft.save_adapter")
    return cfg


def _read_tensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error type
        raise FileFormatError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0] if str(e) else e}); "
                              "re-save the adapter") from None


def load_adapter(peft_dir: str, config: LlamaConfig, *, dtype=jnp.float32) -> tuple[Any, dict]:
    """Read a peft adapter directory (or one written by `save_adapter`) into `(spec, adapter)` for `config`.

    Every tensor is checked against the model: a shape mismatch names the tensor and both shapes, a tensor the
    config does not account for or a missing one is an error. Unsupported peft types and options are refused by
    name. Entries the stacked layout needs but peft does not store (rank padding, untransformed layers) are zero.
    """
    cfg_path, w_path = os.path.join(peft_dir, CONFIG_NAME), os.path.join(peft_dir, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise FileFormatError(f"{peft_dir}: no {CONFIG_NAME}; not an adapter directory (pass the directory that "
                              "save_adapter or peft's save_pretrained wrote)")
    if not os.path.isfile(w_path):
        other = (" (only adapter_model.bin, a pickle: re-save it with peft's save_pretrained(safe_serialization=True))"
                 if os.path.isfile(os.path.join(peft_dir, "adapter_model.bin")) else
                 "; the adapter's weights are missing: copy the whole directory that save_adapter wrote")
        raise FileFormatError(f"{peft_dir}: no {WEIGHTS_NAME}{other}")
    cfg = read_adapter_config(cfg_path)
    spec = _spec_from_config(cfg, cfg_path, config.tie_word_embeddings)
    tensors = _read_tensors(w_path)
    if isinstance(spec, (PromptTuningSpec, PrefixTuningSpec)):
        return spec, _load_prompt(spec, cfg, tensors, config, w_path, dtype)
    if isinstance(spec, (HoulsbySpec, BitFitSpec)):
        return spec, _load_own_format(spec, tensors, config, w_path, dtype)
    params = abstract_params(config)
    adapter, expected = _fill_tree(spec, params, cfg_path)
    for key, value in tensors.items():
        if key not in expected:
            raise FileFormatError(f"{w_path}: tensor '{key}' does not belong to this adapter config on a "
                             f"{config.model_type} model (modules: {_short_modules(expected)})")
        path, index, transform, shape = expected.pop(key)
        if tuple(value.shape) != shape:
            raise FileFormatError(f"{w_path}: tensor '{key}' has shape {tuple(value.shape)}, the model expects {shape}")
        leaf = np.asarray(get_path(adapter, path))
        leaf[index] = transform(value.astype(np.float32))
        set_path(adapter, path, leaf)
    if expected:
        missing = sorted(expected)
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileFormatError(f"{w_path}: missing tensor '{missing[0]}'{more} that the adapter config implies")
    return spec, _to_jax(adapter, dtype)


def _load_own_format(spec: Any, tensors: dict[str, np.ndarray], config: LlamaConfig, where: str, dtype) -> dict:
    """jaxft's own adapter format (dotted adapter-tree paths), every tensor checked against the tree `init` builds for
    this spec and model (shapes only: no weights are made)."""
    expected = _flat(jax.eval_shape(lambda p: init(spec, config, p, jax.random.key(0)), abstract_params(config)))
    for key, value in tensors.items():
        if key not in expected:
            raise FileFormatError(f"{where}: tensor '{key}' does not belong to a {type(spec).__name__} adapter on "
                                  f"this {config.model_type} model; was it saved for another model?")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FileFormatError(f"{where}: tensor '{key}' has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(expected[key].shape)}; the adapter was made for another model")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileFormatError(f"{where}: missing tensor '{missing[0]}'{more} that the adapter config implies")
    adapter: dict = {}
    for key, value in tensors.items():
        set_path(adapter, tuple(key.split(".")), jnp.asarray(value, dtype))
    return adapter


def _to_jax(tree: Any, dtype) -> Any:
    if isinstance(tree, dict):
        return {k: _to_jax(v, dtype) for k, v in tree.items()}
    return jnp.asarray(tree, dtype)


def _short_modules(expected: dict) -> str:
    return ", ".join(sorted({k.rsplit(".", 2)[0].split(".")[-1] for k in expected})) or "none left"


def _fill_tree(spec: Any, params: dict, where: str) -> tuple[dict, dict]:
    """Host buffers of the adapter (zeros, ones for IA3) and the table of expected peft tensors:
    key -> (adapter path, index into the leaf, transform from peft's layout, peft shape)."""
    adapter: dict = {}
    expected: dict = {}
    for mp in plan(spec, params, where):
        path = (*mp.module.path, "kernel")
        n, d_in, d_out = len(mp.active), mp.module.d_in, mp.module.d_out
        lead = (n,) if mp.module.stacked else ()
        for i, name in iter_instances(mp):
            at = (i,) if mp.module.stacked else ()
            if isinstance(spec, IA3Spec):
                shape = (1, d_in) if mp.feedforward else (d_out, 1)
                expected[f"{PREFIX}{name}.ia3_l"] = ((*path, "ia3_l"), at, lambda v: v.reshape(-1), shape)
                continue
            r = int(mp.rank[i])
            expected[f"{PREFIX}{name}.lora_A.weight"] = ((*path, "lora_a"), (*at, slice(None), slice(0, r)),
                                                         lambda v: v.T, (r, d_in))
            expected[f"{PREFIX}{name}.lora_B.weight"] = ((*path, "lora_b"), (*at, slice(0, r)), lambda v: v.T,
                                                         (d_out, r))
            if isinstance(spec, DoraSpec):
                expected[f"{PREFIX}{name}.lora_magnitude_vector"] = ((*path, "magnitude"), at, lambda v: v,
                                                                     (d_out,))
        if isinstance(spec, IA3Spec):
            set_path(adapter, path, {"ia3_l": np.ones((*lead, d_in if mp.feedforward else d_out), np.float32)})
        else:
            node = {"lora_a": np.zeros((*lead, d_in, mp.max_rank), np.float32),
                    "lora_b": np.zeros((*lead, mp.max_rank, d_out), np.float32)}
            if isinstance(spec, DoraSpec):
                node["magnitude"] = np.zeros((*lead, d_out), np.float32)
            set_path(adapter, path, node)
    for m in spec.modules_to_save:
        tpath = ("model", "embed_tokens", "weight") if m == "embed_tokens" else ("lm_head", "kernel")
        if get_path(params, tpath) is None:
            raise ConfigError(f"modules_to_save: '{m}' does not exist in this model (its embeddings are tied); "
                              "list 'embed_tokens' with ensure_weight_tying")
        shape = tuple(get_path(params, tpath).shape)
        key, transpose = _SAVED_KEYS[tpath]
        hf_shape = shape[::-1] if transpose else shape
        set_path(adapter, tpath, np.zeros(shape, np.float32))
        expected[PREFIX + key] = (tpath, (), (lambda v: v.T) if transpose else (lambda v: v), hf_shape)
        if tpath[0] == "model" and get_path(params, ("lm_head", "kernel")) is None:
            # peft with ensure_weight_tying writes the tied head as well; it must equal the embeddings
            expected[PREFIX + "lm_head.weight"] = (tpath, (), lambda v: v, hf_shape)
    return adapter, expected


def _load_prompt(spec: Any, cfg: dict, tensors: dict, config: LlamaConfig, where: str, dtype) -> dict:
    if set(tensors) != {"prompt_embeddings"}:
        raise FileFormatError(f"{where}: expected exactly one tensor 'prompt_embeddings', found {sorted(tensors)}")
    value = tensors["prompt_embeddings"].astype(np.float32)
    p, L, K, hd = spec.num_virtual_tokens, config.num_hidden_layers, config.num_key_value_heads, config.head_dim
    if isinstance(spec, PromptTuningSpec):
        shape = (p, config.hidden_size)
    else:
        shape = (p, L * 2 * K * hd)
    if tuple(value.shape) != shape:
        raise FileFormatError(f"{where}: tensor 'prompt_embeddings' has shape {tuple(value.shape)}, the model expects "
                         f"{shape}")
    if isinstance(spec, PromptTuningSpec):
        return {"prompt_embeddings": jnp.asarray(value, dtype)}
    kv = value.reshape(p, L, 2, K, hd).transpose(1, 2, 0, 3, 4)  # -> [L, 2, P, K, hd]
    return {"prefix_keys": jnp.asarray(kv[:, 0], dtype), "prefix_values": jnp.asarray(kv[:, 1], dtype)}


def _listify(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _lora_config(spec: Any, plans: list, config: LlamaConfig, base: str | None) -> dict:
    targets = spec.target_modules
    if targets == "all-linear":  # peft stores the expanded names too; vLLM needs them
        targets = sorted({mp.module.path[-1] for mp in plans})
    saved = list(spec.modules_to_save)
    tied_embed = config.tie_word_embeddings and "embed_tokens" in saved
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
        "r": spec.r, "lora_alpha": _number(spec.alpha), "lora_dropout": spec.dropout,
        "target_modules": _listify(targets), "exclude_modules": _listify(spec.exclude_modules),
        "use_rslora": spec.use_rslora, "use_dora": isinstance(spec, DoraSpec),
        "init_lora_weights": "gaussian" if spec.init == "gaussian" else True,
        "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": {k: _number(v) for k, v in spec.alpha_pattern},
        "layers_to_transform": _listify(spec.layers_to_transform), "layers_pattern": None,
        "modules_to_save": saved or None, "ensure_weight_tying": tied_embed, "bias": "none", "fan_in_fan_out": False,
    }


def _lora_tensors(spec: Any, plans: list, adapter: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for mp in plans:
        path = (*mp.module.path, "kernel")
        node = {k: np.asarray(v) for k, v in get_path(adapter, path).items()}
        for i, name in iter_instances(mp):
            leaf = {k: (v[i] if mp.module.stacked else v) for k, v in node.items()}
            if isinstance(spec, IA3Spec):
                vec = leaf["ia3_l"]
                out[f"{PREFIX}{name}.ia3_l"] = vec.reshape(1, -1) if mp.feedforward else vec.reshape(-1, 1)
                continue
            r = int(mp.rank[i])
            out[f"{PREFIX}{name}.lora_A.weight"] = leaf["lora_a"][:, :r].T
            out[f"{PREFIX}{name}.lora_B.weight"] = leaf["lora_b"][:r, :].T
            if isinstance(spec, DoraSpec):
                out[f"{PREFIX}{name}.lora_magnitude_vector"] = leaf["magnitude"]
    for path, (key, transpose) in _SAVED_KEYS.items():
        value = get_path(adapter, path)
        if value is None:
            continue
        value = np.asarray(value)
        out[PREFIX + key] = value.T if transpose else value
        if path[0] == "model" and config.tie_word_embeddings:
            out[PREFIX + "lm_head.weight"] = value  # peft's ensure_weight_tying writes the tied head too
    return out


def _prompt_config(spec: Any, adapter: dict, config: LlamaConfig, base: str | None) -> tuple[dict, dict]:
    p = spec.num_virtual_tokens
    cfg = {"task_type": "CAUSAL_LM", "base_model_name_or_path": base, "inference_mode": True,
           "num_virtual_tokens": p, "num_transformer_submodules": 1, "num_layers": config.num_hidden_layers}
    if isinstance(spec, PromptTuningSpec):
        cfg.update(peft_type="PROMPT_TUNING", token_dim=config.hidden_size,
                   num_attention_heads=config.num_attention_heads, prompt_tuning_init="RANDOM")
        return cfg, {"prompt_embeddings": np.asarray(adapter["prompt_embeddings"])}
    k, v = np.asarray(adapter["prefix_keys"]), np.asarray(adapter["prefix_values"])  # [L, P, K, hd]
    kv = np.stack([k, v], axis=1).transpose(2, 0, 1, 3, 4)  # [P, L, 2, K, hd], peft's order per virtual token
    kdim = config.num_key_value_heads * config.head_dim
    cfg.update(peft_type="PREFIX_TUNING", token_dim=kdim, num_attention_heads=config.num_key_value_heads,
               encoder_hidden_size=kdim, prefix_projection=False)
    return cfg, {"prompt_embeddings": np.ascontiguousarray(kv.reshape(kv.shape[0], -1))}


def _flat(tree: Any, path: tuple[str, ...] = ()) -> dict[str, Any]:
    """`{'a.b.c': leaf}` for a nested dict of leaves."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, (*path, k)))
        return out
    return {".".join(path): tree}


def save_adapter(spec: Any, adapter: dict, out_dir: str, config: LlamaConfig, *,
                 base_model_name_or_path: str | None = None, overwrite: bool = False) -> list[str]:
    """Write `adapter_config.json` and `adapter_model.safetensors` in peft's format (jaxft's own for Houlsby and
    BitFit) and return the reasons vLLM will not serve the result (empty when it will); they are also issued as
    one `UserWarning`. Tensors keep the adapter's dtype; each layer's LoRA factors are cut to its own rank.

    `base_model_name_or_path` is written into the config as given: peft's `AutoPeftModelForCausalLM` loads the base
    from it, so pass the Hub id or the local directory of the base weights. An existing non-empty `out_dir` is
    refused unless `overwrite=True` (which replaces the two files and leaves other files there alone).
    """
    from safetensors.numpy import save_file

    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose another directory or pass "
                              "overwrite=True")

    if isinstance(spec, (PromptTuningSpec, PrefixTuningSpec)):
        cfg, tensors = _prompt_config(spec, adapter, config, base_model_name_or_path)
    elif isinstance(spec, (HoulsbySpec, BitFitSpec)):
        kind = "JAXFT_HOULSBY" if isinstance(spec, HoulsbySpec) else "JAXFT_BITFIT"
        cfg = {"peft_type": kind, "base_model_name_or_path": base_model_name_or_path,
               **{k: _listify(v) for k, v in dataclasses.asdict(spec).items()}}
        tensors = {k: np.asarray(v) for k, v in _flat(adapter).items()}
    else:
        plans = plan(spec, abstract_params(config))
        if isinstance(spec, IA3Spec):
            cfg = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
                   "inference_mode": True, "target_modules": _listify(spec.target_modules),
                   "feedforward_modules": _listify(spec.feedforward_modules),
                   "exclude_modules": _listify(spec.exclude_modules),
                   "modules_to_save": list(spec.modules_to_save) or None, "fan_in_fan_out": False}
        else:
            cfg = _lora_config(spec, plans, config, base_model_name_or_path)
        tensors = _lora_tensors(spec, plans, adapter, config)
    os.makedirs(out_dir, exist_ok=True)
    # Each file is written beside its target and renamed over it, so an interrupted save never leaves a torn file.
    w_tmp, c_tmp = os.path.join(out_dir, WEIGHTS_NAME + ".tmp"), os.path.join(out_dir, CONFIG_NAME + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, w_tmp, metadata={"format": "pt"})
    with open(c_tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(w_tmp, os.path.join(out_dir, WEIGHTS_NAME))
    os.replace(c_tmp, os.path.join(out_dir, CONFIG_NAME))
    reasons = vllm_warnings(spec, plans if isinstance(spec, (LoraSpec, DoraSpec)) else None)
    if reasons:
        warnings.warn(f"{out_dir}: vLLM will not serve this adapter: " + "; ".join(reasons), stacklevel=2)
    return reasons
