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
Methods that add no inputs (`adds_inputs(spec)` False) need none of this.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxft.models.config import LlamaConfig
from jaxft.peft.methods.prompt import check_unpacked
from jaxft.peft.registry import method_for

__all__ = ["adds_inputs", "check_unpacked", "generation_inputs", "num_virtual_tokens", "prompt_inputs"]


def num_virtual_tokens(spec: Any) -> int:
    """How many positions the method puts in front of every row (prompt / prefix tuning), 0 for the others."""
    return method_for(spec).virtual_tokens(spec)


def adds_inputs(spec: Any) -> bool:
    """Whether the method gives the model inputs besides the parameters (then use `prompt_inputs` in training and
    `generation_inputs` in generation; rows must not be packed for prompt tuning)."""
    return num_virtual_tokens(spec) > 0


def generation_inputs(spec: Any, adapter: dict) -> dict:
    """Keyword arguments of `jaxft.generate.greedy_generate` carrying the method's inputs (`virtual_tokens=` or
    `prefix=`); empty for methods that add none."""
    return method_for(spec).model_inputs(spec, adapter)


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
    return method_for(spec).forward_inputs(spec, adapter, input_ids, segment_ids, config, params, dtype)
