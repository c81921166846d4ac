"""Record formats: every supported record becomes a `Conversation` (a list of chat messages) or a plain `text`.

- messages: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` with at least one assistant
  turn, which is not the first message (it needs something to answer).
- prompt_completion: `{"prompt": str, "completion": str}` becomes a user turn + an assistant turn; the conversational
  form `{"prompt": [messages], "completion": [messages]}` is used as given. The completion is the `completion` part.
- alpaca: `{"instruction": str, "input": str (optional), "output": str}` becomes a user turn (`instruction`, then a
  blank line and `input` when it is not empty) + an assistant turn (`output`).
- text: `{"text": str}` for continued pre-training, tokenized without a chat template.

Chat formats are rendered through the tokenizer's chat template (see `jaxft.data.render`), so plain prompt/completion
and alpaca records look exactly like a chat with the model. A record that does not fit its format is malformed: the
parser returns the reason as a string instead of a record.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Sequence

from jaxft.schema import ConfigError

FORMATS = ("messages", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant")
# format: auto picks the first format whose columns are all present.
_DETECT = (("messages", ("messages",)), ("prompt_completion", ("prompt", "completion")), ("alpaca", ("instruction", "output")), ("text", ("text",)))


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One usable record.

    messages: ({"role", "content"}, ...) for chat formats; empty for `text`.
    final_start: index of the first message of the final completion: len(prompt) for prompt/completion, otherwise the
      start of the last run of assistant messages. `loss_on: completion` trains the assistant turns from here on.
    text: the document of a `text` record, else None.
    source: index of the source among the split's sources; number: its line/record number there.
    """

    messages: tuple[dict[str, str], ...]
    final_start: int
    text: str | None = None
    source: int = 0
    number: int = 0

    @property
    def is_chat(self) -> bool:
        return self.text is None

    def key(self) -> str:
        """Identity for dedup and decontamination: roles + contents with all whitespace runs collapsed."""
        if self.text is not None:
            body = "T\x1e" + _norm(self.text)
        else:
            body = "\x1e".join(m["role"] + "\x1f" + _norm(m["content"]) for m in self.messages)
        return hashlib.blake2b(body.encode("utf-8"), digest_size=16).hexdigest()


def _norm(s: str) -> str:
    return " ".join(s.split())


def detect_format(columns: Sequence[str], where: str) -> str:
    """The format `auto` resolves to for a source with these columns; ConfigError when none fits."""
    present = set(columns)
    for fmt, needed in _DETECT:
        if all(c in present for c in needed):
            return fmt
    raise ConfigError(
        f"{where}: cannot detect the format from columns {sorted(present)[:12]}; expected messages, prompt+completion, "
        "instruction+output or text; rename the columns or set format: explicitly"
    )


def _messages(value: Any, what: str) -> tuple[dict[str, str], ...] | str:
    if not isinstance(value, (list, tuple)) or not value:
        return f"{what} is not a non-empty list of messages"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"{what}[{i}] is not an object with role and content"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"{what}[{i}].role is {role!r}, not one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"{what}[{i}].content is {'missing' if content is None else type(content).__name__}, not a string"
        out.append({"role": role, "content": content})
    return tuple(out)


def _check_chat(messages: tuple[dict[str, str], ...], final_start: int) -> str | None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        return "no assistant message"
    if roles[0] == "assistant":
        return "the first message is an assistant message; it has nothing to answer"
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            return f"assistant message {i} is empty"
    if "assistant" not in roles[final_start:]:
        return "the completion has no assistant message"
    return None


def _final_run_start(messages: tuple[dict[str, str], ...]) -> int:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    start = last
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    return start


def _as_turns(value: Any, role: str, what: str) -> tuple[dict[str, str], ...] | str:
    if isinstance(value, str):
        return ({"role": role, "content": value},)
    return _messages(value, what)


def parse_record(record: dict, fmt: str, source: int = 0, number: int = 0) -> Conversation | str:
    """Turn one raw record into a `Conversation`, or return why it is malformed (a short phrase)."""
    if fmt == "text":
        text = record.get("text")
        if not isinstance(text, str):
            return "text is missing or not a string"
        if not text.strip():
            return "text is empty"
        return Conversation(messages=(), final_start=0, text=text, source=source, number=number)
    if fmt == "messages":
        messages = _messages(record.get("messages"), "messages")
        if isinstance(messages, str):
            return messages
        final_start = _final_run_start(messages) if "assistant" in [m["role"] for m in messages] else 0
    elif fmt == "prompt_completion":
        prompt = _as_turns(record.get("prompt"), "user", "prompt")
        completion = _as_turns(record.get("completion"), "assistant", "completion")
        for part, name in ((prompt, "prompt"), (completion, "completion")):
            if isinstance(part, str):
                return part
            if isinstance(record.get(name), str) and not record[name].strip():
                return f"{name} is empty"
        messages, final_start = prompt + completion, len(prompt)
    elif fmt == "alpaca":
        instruction, extra, output = record.get("instruction"), record.get("input"), record.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            return "instruction is missing or empty"
        if not isinstance(output, str):
            return "output is missing or not a string"
        if extra is not None and not isinstance(extra, str):
            return "input is not a string"
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        messages, final_start = ({"role": "user", "content": user}, {"role": "assistant", "content": output}), 1
    else:
        raise ConfigError(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    problem = _check_chat(messages, final_start)
    if problem:
        return problem
    return Conversation(messages=messages, final_start=final_start, source=source, number=number)
