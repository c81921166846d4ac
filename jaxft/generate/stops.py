"""Stop strings on the host: one request's output as the engine hands it out, decoded to text, cut at the first
stop string, and released in pieces for streaming.

    scan = StopScanner(tokenizer, stop=["\\n\\n", "User:"])
    for event in events_of_one_slot:          # the Engine's `add` / `step` Events for this request
        if scan.add(event):                   # True: a stop string ended the text; stop the slot
            break
        print(scan.delta(final=False), end="")
    print(scan.delta(final=True))             # what was held back
    scan.tokens, scan.text, scan.finish       # trimmed to the token that completed the stop string; "stop"

Stop strings need the tokenizer, so the engine cannot check them inside its device loop (stop *token* sequences
it checks there); the caller checks them after each `step(n)`, so a stop string may end anywhere inside the n
tokens of a step, and across token and step boundaries: the scanner decodes the whole output each time, finds the
first stop string in the text, and drops the tokens after the one that completed it. `jaxft.generate.text.run`
and the server's scheduler both use it.
"""

from __future__ import annotations

from typing import Sequence

from jaxft.generate.engine import Event


class StopScanner:
    """One request's output so far: `tokens` (ids, EOS included when it ended the request), `logprobs` and
    `top_logprobs` (per token, None when the engine computes none), `text` (decoded with special tokens skipped,
    cut before the first stop string: OpenAI's convention, the stop string is not returned), `finish` (None while
    running, else "stop" or "length") and `sent` (characters of `text` already handed out by `delta`).

    tokenizer: anything with `decode(ids, skip_special_tokens=True)`. stop: the stop strings (empty ones ignored).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = None
        self.top_logprobs: list[list[tuple[int, float]]] | None = None
        self.text, self.sent, self.finish = "", 0, None
        self._clean = 0  # leading tokens known to decode to text holding no stop string

    def add(self, event: Event) -> bool:
        """Take one Event's tokens (and logprobs). Returns True when a stop string ended the text: `text` is then
        cut before it, `tokens` and the logprobs end with the token that completed it, and `finish` is "stop".
        Otherwise `finish` is the event's."""
        self.tokens += event.tokens
        if event.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(event.logprobs)
        if event.top_logprobs is not None:
            self.top_logprobs = (self.top_logprobs or []) + list(event.top_logprobs)
        self.text = self._decode(self.tokens)
        self.finish = event.finish
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if not hits:
            self._clean = len(self.tokens)
            return False
        n = self._clean + 1  # the shortest prefix of the tokens whose text holds a stop string
        while n < len(self.tokens) and not any(s in self._decode(self.tokens[:n]) for s in self.stop):
            n += 1
        self.tokens, self.text, self.finish = self.tokens[:n], self.text[:min(hits)], "stop"
        if self.logprobs is not None:
            self.logprobs = self.logprobs[:n]
        if self.top_logprobs is not None:
            self.top_logprobs = self.top_logprobs[:n]
        return True

    def delta(self, final: bool) -> str:
        """The text not handed out yet, marked as handed out. While running (`final` False) an incomplete UTF-8
        character at the end, and the last characters that could still begin a stop string, are held back."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                end -= 1
            if self.stop:
                end = max(self.sent, end - (max(len(s) for s in self.stop) - 1))
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
