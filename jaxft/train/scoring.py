"""The trainer's held-out measurements, computed by `jaxft.eval`: the eval loss over the eval split, and exact match
of greedy generations against the references of the eval examples that end in an assistant turn. This module only
binds the trainer's (trainable, frozen) trees into the model `jaxft.eval` scores."""

from __future__ import annotations

from typing import Any

from jaxft import peft
from jaxft.eval.likelihood import mean_loss
from jaxft.eval.model import EvalModel
from jaxft.eval.tasks import exact_match_percent, generate_texts
from jaxft.train.step import StaticModel, bound_params


def eval_loss(eval_step, trainable: Any, frozen: Any, data, batch_size: int) -> float | None:
    """Mean token loss (nats) over the eval split of `data` (a `jaxft.data.Prepared`); None without an eval split.
    `eval_step` is `make_eval_step(model)`."""
    return mean_loss(lambda batch: eval_step(trainable, frozen, batch), data.eval_batches(batch_size))


def generation_prompts(data, limit: int) -> list:
    """The `(prompt_ids, reference)` pairs that exact match scores: the first `limit` of the eval split's."""
    return data.eval_generation[:limit]


def eval_model(model: StaticModel, trainable: Any, frozen: Any, tokenizer) -> EvalModel:
    """The model being trained as `jaxft.eval` scores it (adapter bound; prompt/prefix inputs carried)."""
    adds = model.spec is not None and peft.adds_inputs(model.spec)
    return EvalModel("trained", model.config, bound_params(model, trainable, frozen), tokenizer, model.options,
                     model.spec if adds else None, trainable if adds else None)


def exact_match(model: StaticModel, trainable: Any, frozen: Any, tokenizer, items: list, *, max_new_tokens: int,
                batch_size: int) -> float | None:
    """Percentage (0-100) of `items` (`(prompt_ids, reference)` pairs) whose greedy generation, decoded without special
    tokens and stripped, equals the stripped reference; None when there is no item."""
    if not items:
        return None
    outputs = generate_texts(eval_model(model, trainable, frozen, tokenizer), [p for p, _ in items],
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    return exact_match_percent(outputs, [ref for _, ref in items])
