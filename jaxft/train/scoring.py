"""Held-out measurements of a model being trained: the eval loss over the eval split, and exact match of greedy
generations against the references of the eval examples that end in an assistant turn."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxft import peft
from jaxft.generate.greedy import greedy_generate
from jaxft.train.step import StaticModel, bound_params


def eval_loss(eval_step, trainable: Any, frozen: Any, data, batch_size: int) -> float | None:
    """Mean token loss (nats) over the eval split of `data` (a `jaxft.data.Prepared`); None without an eval split.
    `eval_step` is `make_eval_step(model)`."""
    total, n = 0.0, 0.0
    for batch in data.eval_batches(batch_size):
        ls, k = eval_step(trainable, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        total, n = total + float(ls), n + float(k)
    return total / n if n else None


def generation_prompts(data, limit: int) -> list:
    """The `(prompt_ids, reference)` pairs that exact match scores: the first `limit` of the eval split's."""
    return data.eval_generation[:limit]


def exact_match(model: StaticModel, trainable: Any, frozen: Any, tokenizer, items: list, *, max_new_tokens: int,
                batch_size: int) -> float | None:
    """Percentage (0-100) of `items` (`(prompt_ids, reference)` pairs) whose greedy generation, decoded without special
    tokens and stripped, equals the stripped reference; None when there is no item."""
    if not items:
        return None
    params = bound_params(model, trainable, frozen)
    extra = peft.generation_inputs(model.spec, trainable) if model.spec is not None else {}
    eos = {tokenizer.eos_token_id}
    eid = model.config.eos_token_id
    eos |= set(eid) if isinstance(eid, tuple) else ({eid} if eid is not None else set())
    outs = greedy_generate(model.config, params, [list(p) for p, _ in items], max_new_tokens=max_new_tokens,
                           eos_token_ids=sorted(e for e in eos if e is not None), batch_size=batch_size,
                           options=model.options, **extra)
    hits = sum(tokenizer.decode(o, skip_special_tokens=True).strip() == ref.strip() for o, (_, ref) in zip(outs, items))
    return 100.0 * hits / len(items)
