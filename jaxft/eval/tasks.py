"""Evaluation files and generation tasks: prompts with references read from JSONL, rendered zero-shot or with k
examples in front (the "have you tried prompting?" baseline), answered by greedy decoding and scored.

A generation-task line is any chat record the trainer reads (`messages`, `prompt`/`completion`, alpaca
`instruction`/`input`/`output`): the final assistant turn is the reference and everything before it the prompt;
`{"prompt": ..., "reference": ...}` is accepted too, and an optional `"regex"` field sets that item's pattern.
A multiple-choice line is `{"context": str, "choices": [str, ...], "answer": int}` (`query` / `gold` as lm-eval
names them are accepted). A perplexity file is a `.txt` (one text) or JSONL with a `"text"` field per line.
A line that does not fit is an error naming the file and line (an evaluation silently scoring fewer items than its
file holds would mislead).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Sequence

from jaxft.data.formats import detect_format, parse_record
from jaxft.errors import ConfigError, FileFormatError
from jaxft.eval.likelihood import ChoiceItem
from jaxft.eval.model import EvalModel
from jaxft.generate.greedy import greedy_generate
from jaxft.io.files import decode_utf8, not_json, read_bytes, where


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One generation item: the prompt `messages` (chat turns before the reference), the `reference` text, an
    optional per-item `regex`, and the file line it came from."""

    messages: tuple[dict[str, str], ...]
    reference: str
    regex: str | None = None
    line: int = 0


def _jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    text = decode_utf8(read_bytes(path, what), path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise not_json(path, e, n) from None
        if not isinstance(value, dict):
            raise FileFormatError(f"{where(path, n)}: a JSON {type(value).__name__}, not an object ({what})")
        rows.append((n, value))
    if not rows:
        raise FileFormatError(f"{path}: holds no records ({what}); write one JSON object per line")
    return rows


def read_task_items(path: str) -> list[TaskItem]:
    """The generation items of a JSONL file (see the module docstring)."""
    items = []
    for n, rec in _jsonl(path, "generation items with references"):
        at = where(path, n)
        if "reference" in rec and "prompt" in rec:
            prompt, ref = rec["prompt"], rec["reference"]
            if not isinstance(prompt, str) or not prompt.strip() or not isinstance(ref, str):
                raise FileFormatError(f"{at}: prompt must be a non-empty string and reference a string")
            messages = ({"role": "user", "content": prompt},)
        else:
            try:
                fmt = detect_format(list(rec), at)
            except ConfigError:
                raise FileFormatError(f"{at}: fields {sorted(rec)[:8]} are no generation item; use prompt+reference, "
                                      "prompt+completion, messages or instruction+output") from None
            if fmt == "text":
                raise FileFormatError(f"{at}: a text record has no reference; use prompt+reference or a chat format")
            conv = parse_record(rec, fmt, number=n)
            if isinstance(conv, str):
                raise FileFormatError(f"{at}: {conv}")
            final = conv.messages[conv.final_start:]
            if any(m["role"] != "assistant" for m in final):
                raise FileFormatError(f"{at}: the record does not end in assistant turns; the last one is the "
                                      "reference")
            messages, ref = conv.messages[:conv.final_start], "\n".join(m["content"] for m in final)
        regex = rec.get("regex")
        if regex is not None and not isinstance(regex, str):
            raise FileFormatError(f"{at}: regex must be a string")
        items.append(TaskItem(tuple(messages), ref, regex, n))
    return items


def read_choice_items(path: str, delimiter: str = " ") -> list[ChoiceItem]:
    """The multiple-choice items of a JSONL file (see the module docstring)."""
    items = []
    for n, rec in _jsonl(path, "multiple-choice items"):
        at = where(path, n)
        context = rec.get("context", rec.get("query"))
        choices, answer = rec.get("choices"), rec.get("answer", rec.get("gold"))
        if not isinstance(context, str) or not context.strip():
            raise FileFormatError(f"{at}: context is missing or empty (a multiple-choice item needs context, "
                                  "choices, answer)")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise FileFormatError(f"{at}: choices must be a list of at least 2 non-empty strings")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise FileFormatError(f"{at}: answer must be the index (0-{len(choices) - 1}) of the right choice")
        items.append(ChoiceItem(context, tuple(choices), answer, delimiter))
    return items


def read_texts(path: str) -> list[str]:
    """A `.txt` file as one text, or the `"text"` field of every line of a JSONL file."""
    if path.endswith((".jsonl", ".json")):
        texts = []
        for n, rec in _jsonl(path, "texts for perplexity"):
            if not isinstance(rec.get("text"), str) or not rec["text"].strip():
                raise FileFormatError(f"{where(path, n)}: text is missing or empty (one {{\"text\": ...}} per line)")
            texts.append(rec["text"])
        return texts
    text = decode_utf8(read_bytes(path, "a text file for perplexity"), path)
    if not text.strip():
        raise FileFormatError(f"{path}: is empty (a text file for perplexity)")
    return [text]


def shot_messages(shots: Sequence[TaskItem]) -> list[dict[str, str]]:
    """The k examples as alternating user/assistant turns (their system messages dropped: the item's own system
    message, if any, stays first)."""
    out: list[dict[str, str]] = []
    for s in shots:
        out += [m for m in s.messages if m["role"] != "system"] + [{"role": "assistant", "content": s.reference}]
    return out


def render_prompts(tokenizer, items: Sequence[TaskItem], shots: Sequence[TaskItem] = ()) -> list[list[int]]:
    """Token ids of each item's prompt through the tokenizer's chat template with the generation prompt; `shots`
    go in front as earlier turns of the same chat (after the item's system message)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("the tokenizer has no chat template; generation items are rendered as chats: evaluate a "
                          "chat model (or save a chat_template with its tokenizer)")
    examples = shot_messages(shots)
    out = []
    for it in items:
        system = [m for m in it.messages[:1] if m["role"] == "system"]
        messages = system + examples + list(it.messages[len(system):])
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def generate_texts(model: EvalModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int,
                   on_batch: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations of `prompts` (token ids), decoded without special tokens and stripped."""
    outs: list[list[int]] = [[] for _ in prompts]
    eos = model.eos_token_ids()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch, as inside
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        got = greedy_generate(model.config, model.params, [list(prompts[i]) for i in chunk],
                              max_new_tokens=max_new_tokens, eos_token_ids=eos, batch_size=batch_size,
                              options=model.options, **model.generation_inputs())
        for i, o in zip(chunk, got):
            outs[i] = o
        if on_batch is not None:
            on_batch(len(chunk))
    return [model.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def exact_match_percent(outputs: Sequence[str], references: Sequence[str]) -> float | None:
    """Percentage (0-100) of outputs equal to their reference after stripping both; None without items."""
    if not outputs:
        return None
    return 100.0 * sum(o.strip() == r.strip() for o, r in zip(outputs, references)) / len(outputs)
