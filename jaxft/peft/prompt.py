"""Prompt tuning and prefix tuning: the extra inputs they give the model, with the positions peft gives them.

peft prepends the virtual tokens before the real ones, so the real tokens of a row start at position
`num_virtual_tokens` (prompt tuning: `inputs_embeds = cat(prompts, embeds)`; prefix tuning: a key/value cache of
length P makes the first real position P). `prompt_inputs` returns the keyword arguments of `jaxft.forward` /
`jaxft.hidden_states` that do the same, and how many leading outputs belong to virtual tokens:

    kw, n_virtual = prompt_inputs(spec, adapter, input_ids, segment_ids=segment_ids)
    logits = jaxft.forward(config, params, **kw)[:, n_virtual:]          # [B, T, V], the real tokens

Prompt tuning needs one segment per row (the virtual tokens are prepended to the row): a packed row is refused
(the check runs on concrete `segment_ids`; under `jit`, call `check_unpacked` on the host batch or on the data
config). Prefix tuning works with packed rows: every segment sees the prefix and starts at position P.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import LlamaConfig
from jaxft.models.llama import segment_positions
from jaxft.peft.specs import PrefixTuningSpec, PromptTuningSpec
from jaxft.schema import ConfigError


def init_prompt(spec: Any, config: LlamaConfig, params: dict, rng: jax.Array, *, tokenizer=None,
                dtype=jnp.float32) -> dict:
    """The adapter of a prompt or prefix tuning spec: `{'prompt_embeddings': [P, D]}` or
    `{'prefix_keys': [L, P, K, hd], 'prefix_values': [L, P, K, hd]}` (N(0, 1) as peft's `nn.Embedding`)."""
    p = spec.num_virtual_tokens
    if isinstance(spec, PrefixTuningSpec):
        shape = (config.num_hidden_layers, p, config.num_key_value_heads, config.head_dim)
        k1, k2 = jax.random.split(rng)
        return {"prefix_keys": jax.random.normal(k1, shape, jnp.float32).astype(dtype),
                "prefix_values": jax.random.normal(k2, shape, jnp.float32).astype(dtype)}
    if spec.init == "random":
        return {"prompt_embeddings": jax.random.normal(rng, (p, config.hidden_size), jnp.float32).astype(dtype)}
    if tokenizer is None:
        raise ConfigError("PromptTuningSpec(init='text') needs the tokenizer: init(..., tokenizer=tok)")
    ids = list(tokenizer(spec.init_text)["input_ids"])
    if not ids:
        raise ConfigError(f"PromptTuningSpec.init_text: {spec.init_text!r} tokenizes to nothing")
    ids = (ids * math.ceil(p / len(ids)))[:p]  # peft: repeat, then cut to num_virtual_tokens
    table = params["model"]["embed_tokens"]["weight"]
    return {"prompt_embeddings": jnp.take(table, jnp.asarray(ids), axis=0).astype(dtype)}


def check_unpacked(segment_ids: Any) -> None:
    """Refuse rows holding more than one segment (prompt tuning prepends its tokens to a whole row)."""
    seg = np.asarray(segment_ids)
    first = np.where(seg != 0, seg, seg.max(axis=1, keepdims=True)).min(axis=1)
    packed = np.nonzero(((seg != 0) & (seg != first[:, None])).any(axis=1))[0]
    if packed.size:
        raise ValueError(f"prompt tuning: row {int(packed[0])} of the batch packs more than one segment; prompt "
                         "tuning prepends its virtual tokens to a whole row, so turn packing off for this method")


def prompt_inputs(spec: Any, adapter: dict, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
                  config: LlamaConfig | None = None, params: dict | None = None, dtype=jnp.float32
                  ) -> tuple[dict, int]:
    """Keyword arguments for `jaxft.forward` that add the virtual tokens, and how many leading outputs to drop.

    input_ids[B, T], segment_ids[B, T] (0 = padding; default: all ones). Prompt tuning returns `input_ids`
    extended to `[B, P + T]` (zeros in front, unused), `embeds[B, P + T, D]` (needs `config` and `params` for the
    token embeddings), `positions` and `segment_ids`; n_virtual = P. Prefix tuning returns `input_ids`,
    `positions` (P + the position within each segment), `segment_ids` and `prefix_kv = (k, v)` with
    `k, v[L, B, P, K, hd]`; n_virtual = 0.
    """
    b, t = input_ids.shape
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    p = spec.num_virtual_tokens
    if isinstance(spec, PrefixTuningSpec):
        keys, values = adapter["prefix_keys"], adapter["prefix_values"]
        expect = keys.shape[0], p
        if tuple(keys.shape[:2]) != expect or keys.shape != values.shape:
            raise ValueError(f"prefix adapter: prefix_keys {tuple(keys.shape)} / prefix_values "
                             f"{tuple(values.shape)} do not match num_virtual_tokens={p}")
        kv = tuple(jnp.broadcast_to(x[:, None], (x.shape[0], b, *x.shape[1:])).astype(dtype) for x in (keys, values))
        positions = p + segment_positions(segment_ids)
        return {"input_ids": input_ids, "positions": positions, "segment_ids": segment_ids, "prefix_kv": kv}, 0
    if not isinstance(spec, PromptTuningSpec):
        raise ConfigError(f"prompt_inputs: {type(spec).__name__} is not a prompt method")
    if config is None or params is None:
        raise ValueError("prompt_inputs: prompt tuning needs config= and params= to embed the real tokens")
    if not isinstance(segment_ids, jax.core.Tracer):
        check_unpacked(segment_ids)
    prompts = adapter["prompt_embeddings"]
    if prompts.shape != (p, config.hidden_size):
        raise ValueError(f"prompt adapter: prompt_embeddings has shape {tuple(prompts.shape)}, expected "
                         f"{(p, config.hidden_size)}")
    embeds = jnp.take(params["model"]["embed_tokens"]["weight"], input_ids, axis=0).astype(dtype)
    embeds = jnp.concatenate([jnp.broadcast_to(prompts.astype(dtype)[None], (b, p, prompts.shape[1])), embeds], 1)
    row_segment = jnp.max(segment_ids, axis=1, keepdims=True)  # the row's one segment (0 for an all-padding row)
    segments = jnp.concatenate([jnp.broadcast_to(row_segment, (b, p)), segment_ids], axis=1)
    positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(p), (b, p)), p + segment_positions(segment_ids)], 1)
    ids = jnp.concatenate([jnp.zeros((b, p), input_ids.dtype), input_ids], axis=1)
    return {"input_ids": ids, "positions": positions.astype(jnp.int32), "segment_ids": segments,
            "embeds": embeds}, p
