"""Batched greedy decoding with a KV cache, compiled once per (batch, prompt bucket, max_new_tokens).

Prompts are padded on the left (segment id 0) so every row's next token lands in the same cache slot; positions
count real tokens only, so a left-padded row sees the positions it would see alone.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft.models.config import LlamaConfig
from jaxft.models.llama import ModelOptions, forward_cached, init_cache


def _bucket(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "options"))
def _generate(config: LlamaConfig, params: Any, ids: jax.Array, segment_ids: jax.Array, eos_ids: jax.Array,
              max_new_tokens: int, options: ModelOptions, virtual: jax.Array | None = None,
              prefix: tuple | None = None):
    b = ids.shape[0]
    embeds, prefix_kv, offset = None, None, 0
    if virtual is not None:  # prompt tuning: virtual tokens open every row (left padding after them is ignored)
        n = virtual.shape[0]
        x = jnp.take(params["model"]["embed_tokens"]["weight"], ids, axis=0).astype(options.dtype)
        embeds = jnp.concatenate([jnp.broadcast_to(virtual.astype(options.dtype), (b, *virtual.shape)), x], 1)
        ids = jnp.concatenate([jnp.zeros((b, n), ids.dtype), ids], axis=1)
        segment_ids = jnp.concatenate([jnp.ones((b, n), segment_ids.dtype), segment_ids], axis=1)
    if prefix is not None:  # prefix tuning: learned keys/values in every layer; real tokens start at position P
        prefix_kv = tuple(jnp.broadcast_to(a[:, None], (a.shape[0], b, *a.shape[1:])).astype(options.dtype)
                          for a in prefix)
        offset = prefix[0].shape[1]
    p = ids.shape[1]
    cache = init_cache(config, b, p + max_new_tokens, options.dtype)
    positions = (jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0) + offset).astype(jnp.int32)
    logits, cache = forward_cached(config, params, ids, cache, positions=positions, segment_ids=segment_ids,
                                   options=options, embeds=embeds, prefix_kv=prefix_kv)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos_ids)
    next_pos = positions[:, -1] + 1

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def step(state):
        i, tok, out, done, pos, cache = state
        logits, cache = forward_cached(config, params, tok[:, None], cache, positions=pos[:, None],
                                       segment_ids=jnp.ones((b, 1), jnp.int32), options=options,
                                       prefix_kv=prefix_kv)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out = out.at[:, i].set(jnp.where(done, 0, nxt))
        return i + 1, nxt, out, done | jnp.isin(nxt, eos_ids), pos + 1, cache

    state = (jnp.int32(1), first, out, done, next_pos, cache)
    _, _, out, _, _, _ = jax.lax.while_loop(cond, step, state)
    return out


def greedy_generate(config: LlamaConfig, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_ids: Sequence[int], batch_size: int = 16,
                    options: ModelOptions = ModelOptions(), virtual_tokens: jax.Array | None = None,
                    prefix: tuple | None = None) -> list[list[int]]:
    """Greedy continuations of `prompts` (lists of token ids), each cut after its first EOS (EOS included).

    `virtual_tokens[P, D]` (prompt tuning) are prepended to every prompt; `prefix = (k, v)` with `k, v[L, P, K, hd]`
    (prefix tuning) are prepended keys/values in every layer, real tokens starting at position P, as peft does.

    Rows are grouped in batches of `batch_size`; prompt lengths are bucketed to multiples of 32 so a handful of
    compilations serve a whole evaluation set.
    """
    if not prompts:
        return []
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    eos = jnp.asarray(sorted(set(int(e) for e in eos_token_ids)) or [-1], jnp.int32)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = _bucket(max(len(prompts[i]) for i in rows))
        config.check_sequence_length(width + max_new_tokens, "prompt plus new tokens")
        ids = np.zeros((batch_size, width), np.int32)
        seg = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(rows):
            n = len(prompts[i])
            ids[r, width - n:] = prompts[i]
            seg[r, width - n:] = 1
        seg[len(rows):, -1] = 1  # filler rows: one real token so nothing is all-padding
        out = np.asarray(_generate(config, params, jnp.asarray(ids), jnp.asarray(seg), eos, max_new_tokens, options,
                                   virtual_tokens, prefix))
        eos_set = set(int(e) for e in eos_token_ids)
        for r, i in enumerate(rows):
            toks = []
            for t in out[r].tolist():
                toks.append(t)
                if t in eos_set:
                    break
            results[i] = toks
    return results
