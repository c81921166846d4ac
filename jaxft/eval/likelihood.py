"""Scores from the model's token log-probabilities: multiple-choice items as lm-evaluation-harness scores them,
perplexity over fixed-length windows, and the mean token loss of the trainer's eval split.

Every score comes from one jitted function, `token_logprobs`: `lp[b, t] = log p(ids[b, t+1] | ids[b, :t+1])` over
right-padded rows (segment id 0 marks padding). Row lengths are bucketed to multiples of 32, so an evaluation set
compiles a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxft import peft
from jaxft.errors import ConfigError
from jaxft.eval.model import EvalModel
from jaxft.models.config import LlamaConfig
from jaxft.models.llama import ModelOptions, forward


@functools.partial(jax.jit, static_argnames=("config", "options", "spec"))
def _token_logprobs(config: LlamaConfig, options: ModelOptions, spec: Any, params: Any, adapter: Any,
                    ids_bt: jax.Array, seg_bt: jax.Array) -> jax.Array:
    if spec is not None:  # prompt / prefix tuning: the method's inputs, and its virtual outputs dropped
        kw, n_virtual = peft.prompt_inputs(spec, adapter, ids_bt, segment_ids=seg_bt, config=config, params=params,
                                           dtype=options.dtype)
        logits_btv = forward(config, params, options=options, **kw)[:, n_virtual:]
    else:
        logits_btv = forward(config, params, ids_bt, segment_ids=seg_bt, options=options)
    logits_btv = logits_btv[:, :-1]
    picked_bt = jnp.take_along_axis(logits_btv, ids_bt[:, 1:, None], axis=-1)[..., 0]
    return picked_bt - jax.nn.logsumexp(logits_btv, axis=-1)


def _bucket(n: int, multiple: int = 32) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def token_logprobs(model: EvalModel, rows: Sequence[Sequence[int]], *, batch_size: int = 8,
                   on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """For each row of token ids (length n >= 2), float32[n - 1]: the log-probability of token t+1 given tokens
    0..t. Rows are batched by length (right padding); `on_batch(rows_done)` reports progress."""
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = _bucket(max(len(rows[i]) for i in chunk))
        model.config.check_sequence_length(width, "an evaluation row")
        ids = np.zeros((batch_size, width), np.int32)
        seg = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(chunk):
            ids[r, :len(rows[i])] = rows[i]
            seg[r, :len(rows[i])] = 1
        seg[len(chunk):, 0] = 1  # filler rows: one real token so no row is all padding
        lp = np.asarray(_token_logprobs(model.config, model.options, model.spec, model.params, model.adapter,
                                        jnp.asarray(ids), jnp.asarray(seg)))
        for r, i in enumerate(chunk):
            out[i] = lp[r, :len(rows[i]) - 1]
        if on_batch is not None:
            on_batch(len(chunk))
    return out


# -- multiple choice (lm-evaluation-harness's loglikelihood requests) ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """A multiple-choice item: `context`, the `choices` (continuation texts) and the index of the right one.
    `delimiter` goes between context and every choice (lm-eval's `target_delimiter`, " " by default)."""

    context: str
    choices: tuple[str, ...]
    answer: int
    delimiter: str = " "


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the continuation's tokens
    are those of `tokenize(context + continuation)` after the context's tokens (no special tokens added)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return list(ctx), list(whole[len(ctx):])


@dataclasses.dataclass(frozen=True)
class ChoiceScores:
    """Per item: `loglik[i]` the summed continuation log-probabilities of each choice (nats), `acc[i]` 1.0 when the
    highest-scoring choice is the answer, `acc_norm[i]` the same after dividing each by its choice's UTF-8 byte
    length (lm-eval divides by `len(choice)` in characters: equal for ASCII text)."""

    loglik: list[np.ndarray]
    acc: np.ndarray
    acc_norm: np.ndarray


def multiple_choice(model: EvalModel, items: Sequence[ChoiceItem], *, batch_size: int = 8,
                    on_batch: Callable[[int], None] | None = None) -> ChoiceScores:
    """Score every choice of every item by the sum of its continuation tokens' log-probabilities given the context
    (one forward pass per choice), as lm-eval's `output_type: multiple_choice` does."""
    rows, spans = [], []
    for it in items:
        for choice in it.choices:
            ctx, cont = encode_pair(model.tokenizer, it.context, it.delimiter + choice)
            if not ctx or not cont:
                raise ConfigError(f"multiple-choice item {it.context[:40]!r}: the context and each choice must "
                                  "tokenize to at least one token")
            rows.append(ctx + cont)
            spans.append(len(cont))
    lps = token_logprobs(model, rows, batch_size=batch_size, on_batch=on_batch)
    sums = np.asarray([float(np.sum(lp[-n:], dtype=np.float64)) for lp, n in zip(lps, spans)])
    loglik, acc, acc_norm, k = [], [], [], 0
    for it in items:
        ll = sums[k:k + len(it.choices)]
        k += len(it.choices)
        lengths = np.asarray([len(c.encode("utf-8")) for c in it.choices], np.float64)
        loglik.append(ll)
        acc.append(float(np.argmax(ll) == it.answer))
        acc_norm.append(float(np.argmax(ll / lengths) == it.answer))
    return ChoiceScores(loglik, np.asarray(acc), np.asarray(acc_norm))


# -- perplexity ------------------------------------------------------------------------------------------------------


def window_spans(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """`(begin, end, first)` per window over a text of `n_tokens` tokens: the window feeds tokens [begin, end) and
    scores the predictions of tokens [first, end), those no earlier window scored (transformers' "perplexity of
    fixed-length models" recipe). stride == window gives disjoint chunks; stride < window gives each scored token
    at least window - stride tokens of context. Token 0 has no prediction and is never scored; with disjoint chunks
    neither is the first token of each chunk (it has no context inside its chunk), as in that recipe."""
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            spans.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return spans


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """`nll`: summed negative log-likelihood (nats) over `tokens` scored tokens; `perplexity = exp(nll / tokens)`."""

    nll: float
    tokens: int
    windows: int
    window: int
    stride: int

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / self.tokens)) if self.tokens else float("nan")


def perplexity(model: EvalModel, texts: Sequence[str], *, window: int = 512, stride: int | None = None,
               batch_size: int = 4, on_batch: Callable[[int], None] | None = None) -> Perplexity:
    """Token-level perplexity of `texts` (each tokenized as the tokenizer does by default, each its own sequence)
    over windows of `window` tokens advancing by `stride` (default: `window // 2`), see `window_spans`."""
    stride = window // 2 if stride is None else stride
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(f"perplexity window={window} stride={stride}: need window >= 2 and 1 <= stride <= window")
    model.config.check_sequence_length(_bucket(window), "perplexity window")
    rows, firsts = [], []
    for text in texts:
        ids = list(model.tokenizer(text)["input_ids"])
        for begin, end, first in window_spans(len(ids), window, stride):
            rows.append(ids[begin:end])
            firsts.append(first - begin)  # the first scored token's index inside the row
    lps = token_logprobs(model, rows, batch_size=batch_size, on_batch=on_batch)
    nll = -sum(float(np.sum(lp[f - 1:], dtype=np.float64)) for lp, f in zip(lps, firsts))
    tokens = sum(len(r) - f for r, f in zip(rows, firsts))
    return Perplexity(nll, tokens, len(rows), window, stride)


def count_windows(model: EvalModel, texts: Sequence[str], window: int, stride: int | None = None) -> int:
    """How many rows `perplexity` will run (for a progress bar)."""
    stride = window // 2 if stride is None else stride
    return sum(len(window_spans(len(model.tokenizer(t)["input_ids"]), window, stride)) for t in texts)


# -- the trainer's eval loss -----------------------------------------------------------------------------------------


def mean_loss(step: Callable[[dict], tuple[Any, Any]], batches: Iterable[dict]) -> float | None:
    """Mean token loss (nats) over `batches`: `step(batch)` returns (summed token loss, token count); None when no
    batch has a token. The trainer passes its compiled eval step and the eval split's batches."""
    total, n = 0.0, 0.0
    for batch in batches:
        ls, k = step({key: jnp.asarray(v) for key, v in batch.items()})
        total, n = total + float(ls), n + float(k)
    return total / n if n else None
