"""`modules_to_save`: full trained copies of the embeddings or the output head, for every method whose spec has the
field (LoRA, DoRA, IA3). The copy lives in the adapter tree at the base tree's path
(`adapter['model']['embed_tokens']['weight']`, `adapter['lm_head']['kernel']`), replaces the base value in `bind`,
and goes to peft's file as `base_model.model.<name>.weight` (the head transposed to peft's `[V, D]`).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxft.errors import ConfigError
from jaxft.models.config import LlamaConfig
from jaxft.models.params import param_specs
from jaxft.ops.linear import materialize
from jaxft.peft.targets import get_path, set_path

PREFIX = "base_model.model."
EMBED, HEAD = ("model", "embed_tokens", "weight"), ("lm_head", "kernel")
# tree path -> (peft key, transposed in peft's file)
PEFT_KEYS = {EMBED: ("model.embed_tokens.weight", False), HEAD: ("lm_head.weight", True)}


def names(spec: Any) -> tuple[str, ...]:
    return tuple(getattr(spec, "modules_to_save", ()))


def paths(spec: Any, params: dict, where: str) -> list[tuple[str, ...]]:
    """Tree paths of the `modules_to_save` leaves."""
    out = []
    for m in names(spec):
        short = m.split(".")[-1]
        if short == "embed_tokens":
            out.append(EMBED)
        elif get_path(params, HEAD) is None:
            raise ConfigError(f"{where}.modules_to_save: 'lm_head' on a model with tied embeddings; list "
                              "'embed_tokens' instead (the shared matrix, head included)")
        else:
            out.append(HEAD)
    return out


def init(spec: Any, params: dict, adapter: dict, dtype, where: str) -> None:
    for path in paths(spec, params, where):
        set_path(adapter, path, jnp.asarray(materialize(get_path(params, path)), dtype))


def bind(spec: Any, params: dict, adapter: dict, out: dict, where: str) -> None:
    for path in paths(spec, params, where):
        node = out
        for k in path[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        leaf = get_path(adapter, path)
        if leaf is None:
            raise ValueError(f"adapter is missing {'.'.join(path)} (listed in modules_to_save)")
        want = tuple(get_path(params, path).shape)
        if tuple(leaf.shape) != want:
            raise ValueError(f"adapter tensor {'.'.join(path)} has shape {tuple(leaf.shape)}, the base model expects "
                             f"{want}")
        node[path[-1]] = leaf


def merge(spec: Any, params: dict, bound: dict) -> None:
    for path in paths(spec, params, type(spec).__name__):
        get_path(bound, path[:-1])[path[-1]] = get_path(bound, path).astype(get_path(params, path).dtype)


def refuse_unmerge(spec: Any) -> None:
    if names(spec):
        raise ValueError(f"unmerge: {type(spec).__name__} replaces base values (biases or modules_to_save), so the "
                         "merged tree no longer holds them; keep the base tree instead")


def logical_axes(spec: Any, config: LlamaConfig, out: dict) -> None:
    specs = param_specs(config)
    for path in (EMBED, HEAD):
        if get_path(out, path, "absent") != "absent":
            set_path(out, path, get_path(specs, path).axes)


def peft_tensors(adapter: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    out = {}
    for path, (key, transpose) in PEFT_KEYS.items():
        value = get_path(adapter, path)
        if value is None:
            continue
        value = np.asarray(value)
        out[PREFIX + key] = value.T if transpose else value
        if path == EMBED and config.tie_word_embeddings:
            out[PREFIX + "lm_head.weight"] = value  # peft's ensure_weight_tying writes the tied head too
    return out


def expected_tensors(spec: Any, params: dict, adapter: dict, expected: dict) -> None:
    """Host buffers and expected peft tensors (see `LinearMethod.expected_tensors`) of the saved modules."""
    for m in names(spec):
        path = EMBED if m == "embed_tokens" else HEAD
        if get_path(params, path) is None:
            raise ConfigError(f"modules_to_save: '{m}' does not exist in this model (its embeddings are tied); "
                              "list 'embed_tokens' with ensure_weight_tying")
        shape = tuple(get_path(params, path).shape)
        key, transpose = PEFT_KEYS[path]
        hf_shape = shape[::-1] if transpose else shape
        set_path(adapter, path, np.zeros(shape, np.float32))
        expected[PREFIX + key] = (path, (), (lambda v: v.T) if transpose else (lambda v: v), hf_shape)
        if path == EMBED and get_path(params, HEAD) is None:
            # peft with ensure_weight_tying writes the tied head as well; it must equal the embeddings
            expected[PREFIX + "lm_head.weight"] = (path, (), lambda v: v, hf_shape)


def serve_problems(spec: Any) -> list[str]:
    if names(spec):
        return [f"modules_to_save={list(names(spec))}: vLLM does not load fully trained modules"]
    return []


def config_fields(spec: Any, tied: bool) -> dict:
    saved = list(names(spec))
    return {"modules_to_save": saved or None}


def from_config(cfg: dict, where: str, tied: bool) -> tuple[str, ...]:
    """The spec's `modules_to_save` from peft's field (short names; the tied case needs `ensure_weight_tying`)."""
    saved = tuple(cfg.get("modules_to_save") or ())
    if tied and any(m.split(".")[-1] in ("embed_tokens", "lm_head") for m in saved):
        if not cfg.get("ensure_weight_tying", False):
            raise ConfigError(f"{where}: modules_to_save {list(saved)} on a model with tied embeddings without "
                              "ensure_weight_tying=true (peft then unties input and output embeddings, which "
                              "jaxft's tied model cannot express)")
        saved = ("embed_tokens",)
    return tuple(dict.fromkeys(m.split(".")[-1] for m in saved))
