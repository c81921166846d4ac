"""Greedy decoding of a list of prompts: the trainer's and the evaluations' entry point, over `Engine`."""

from __future__ import annotations

from typing import Any, Sequence

import jax

from jaxft.errors import ConfigError
from jaxft.generate.engine import Engine, length_bucket
from jaxft.models.config import LlamaConfig
from jaxft.models.llama import ModelOptions

# Decode steps per device call between refills of finished slots.
_CHUNK = 16


def greedy_generate(config: LlamaConfig, params: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_token_ids: Sequence[int], batch_size: int = 16,
                    options: ModelOptions = ModelOptions(), virtual_tokens: jax.Array | None = None,
                    prefix: tuple | None = None) -> list[list[int]]:
    """Greedy continuations of `prompts` (lists of token ids), each cut after its first EOS (EOS included).

    `virtual_tokens[P, D]` (prompt tuning) are prepended to every prompt; `prefix = (k, v)` with `k, v[L, P, K, hd]`
    (prefix tuning) are prepended keys/values in every layer, real tokens starting at position P, as peft does.

    Up to `batch_size` prompts decode at once, longest first; a finished row's slot takes the next waiting prompt
    (continuous batching). The cache length is rounded up to a power of two so repeated calls reuse compilations.
    """
    if not prompts:
        return []
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1")
    n_virtual = 0 if virtual_tokens is None else int(virtual_tokens.shape[0])
    need = max(len(p) for p in prompts) + n_virtual + max_new_tokens
    config.check_sequence_length(need + (0 if prefix is None else int(prefix[0].shape[1])), "prompt plus new tokens")
    engine = Engine(config, params, slots=min(batch_size, len(prompts)), max_len=length_bucket(need), options=options,
                    eos_token_ids=eos_token_ids, virtual_tokens=virtual_tokens, prefix=prefix)
    waiting = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    owner: dict[int, int] = {}

    def fill():
        free = engine.free_slots()
        batch, waiting[:] = waiting[:len(free)], waiting[len(free):]
        if batch:
            events = engine.add_many([prompts[i] for i in batch], max_new_tokens=[max_new_tokens] * len(batch),
                                     slots=free[:len(batch)])
            take(events, batch)

    def take(events, indices=None):
        for j, e in enumerate(events):
            if indices is not None:
                owner[e.slot] = indices[j]
            results[owner[e.slot]].extend(e.tokens)
            if e.finish is not None:
                engine.free(e.slot)

    fill()
    while engine.active_slots() or waiting:
        take(engine.step(min(_CHUNK, max_new_tokens)))
        fill()
    return results
