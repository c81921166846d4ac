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

import json
import os
import warnings
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxft.errors import FileFormatError, OutputExistsError
from jaxft.models.config import LlamaConfig
from jaxft.models.params import abstract_params
from jaxft.peft.registry import method_for, method_reading
from jaxft.peft.targets import plan

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


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
    config does not account for or a missing one is an error (`jaxft.errors.FileFormatError`). Unsupported peft
    types and options are refused by name. Entries the stacked layout needs but peft does not store (rank padding,
    untransformed layers) are zero.
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
    method = method_reading(cfg, cfg_path)
    spec = method.spec_from_config(cfg, cfg_path, config.tie_word_embeddings)
    tensors = _read_tensors(w_path)
    adapter = method.load_tensors(spec, tensors, config, abstract_params(config), files=(cfg_path, w_path),
                                  dtype=dtype)
    return spec, adapter


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
        raise OutputExistsError(f"{out_dir}: exists and is not empty; choose another directory or pass "
                              "overwrite=True")
    method = method_for(spec)
    params = abstract_params(config)
    fields = method.config_fields(spec, config, params)
    cfg = {**fields, "base_model_name_or_path": base_model_name_or_path}
    tensors = method.peft_tensors(spec, adapter, config, params)
    os.makedirs(out_dir, exist_ok=True)
    # Each file is written beside its target and renamed over it, so an interrupted save never leaves a torn file.
    w_tmp, c_tmp = os.path.join(out_dir, WEIGHTS_NAME + ".tmp"), os.path.join(out_dir, CONFIG_NAME + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, w_tmp, metadata={"format": "pt"})
    with open(c_tmp, "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(w_tmp, os.path.join(out_dir, WEIGHTS_NAME))
    os.replace(c_tmp, os.path.join(out_dir, CONFIG_NAME))
    reasons = method.serve_problems(spec, plan(spec, params) if method.weight_delta else None)
    if reasons:
        warnings.warn(f"{out_dir}: vLLM will not serve this adapter: " + "; ".join(reasons), stacklevel=2)
    return reasons


def peft_loadable(spec: Any) -> bool:
    """Whether the peft library loads what `save_adapter` writes for this spec (not Houlsby or BitFit, which go out
    in jaxft's own format)."""
    return method_for(spec).peft_format
