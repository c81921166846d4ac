"""Text in, text out over the `Engine`: requests with stop strings (checked on the host every few tokens), streamed
text deltas, a multi-turn chat helper through the tokenizer's chat template, and loading a model with an adapter.

    config, params, tokenizer, extras = load_for_generation("smollm2-135m-instruct", adapter="runs/x/adapter")
    engine = Engine(config, params, slots=4, max_len=2048, eos_token_ids=eos_token_ids(config, tokenizer), **extras)
    chat = Chat(engine, tokenizer, sampling=SamplingParams(temperature=0.7, top_p=0.9))
    print(chat.send("What is LoRA?"))
    print(chat.send("And QLoRA?"))          # the first turn's tokens stay in the slot's cache: only the new ones run
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxft import peft
from jaxft.errors import ConfigError, FileFormatError
from jaxft.generate.engine import Engine, Event
from jaxft.generate.sampling import GREEDY, SamplingParams
from jaxft.generate.stops import StopScanner
from jaxft.io.hf import load_pretrained
from jaxft.io.tokenizer import load_tokenizer
from jaxft.models.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request. prompt: token ids. stop: strings that end the text (checked on the host every
    `check_every` tokens; the text is cut before the first, OpenAI's convention). stop_token_ids: token sequences
    that end it on the device (kept in the tokens and text). slot: a slot to use (chat turns), else any free one."""

    prompt: Sequence[int]
    sampling: SamplingParams = GREEDY
    max_new_tokens: int = 256
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[Sequence[int]] = ()
    slot: int | None = None


@dataclasses.dataclass
class Completion:
    """What a request produced: token ids (EOS included when it ended the request), the decoded text (special
    tokens skipped, cut before a stop string), the finish reason ("stop" or "length") and, when the engine computes
    them, per-token logprobs and top logprobs (see `Event`)."""

    tokens: list[int]
    text: str
    finish: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def eos_token_ids(config: LlamaConfig, tokenizer) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and the model config's `eos_token_id` (one or several)."""
    eos = {tokenizer.eos_token_id}
    eid = config.eos_token_id
    eos |= set(eid) if isinstance(eid, (tuple, list)) else {eid}
    return sorted(e for e in eos if e is not None)


def load_for_generation(model: str, adapter: str | None = None, merge: bool = False):
    """`(config, params, tokenizer, extras)` for a model path or name and an optional peft adapter directory.
    LoRA/DoRA/IA3 come bound as composite leaves (merged into plain weights with `merge=True`); prompt and prefix
    tuning come as `extras` (`virtual_tokens=` / `prefix=` for `Engine`)."""
    config, params = load_pretrained(model)
    tokenizer = load_tokenizer(model)
    extras: dict = {}
    if adapter:
        spec, tree = peft.load_adapter(adapter, config)
        extras = peft.generation_inputs(spec, tree)
        params = peft.merge(params, spec, tree) if merge and peft.mergeable(spec) else peft.bind(params, spec, tree)
    return config, params, tokenizer, extras


def _completion(scan: StopScanner) -> Completion:
    return Completion(scan.tokens, scan.text, scan.finish, scan.logprobs, scan.top_logprobs)


def run(engine: Engine, tokenizer, requests: Sequence[Request], *, check_every: int = 8,
        on_text: Callable[[int, str], Any] | None = None,
        on_done: Callable[[int, Completion], Any] | None = None) -> list[Completion]:
    """Generate every request to completion with continuous batching: requests wait for a free slot and take it as
    earlier ones finish. `on_text(i, delta)` receives request i's new text as it comes (streaming), `on_done(i,
    completion)` each request as it finishes. Slots of
    finished requests are freed, except those a request named (`Request.slot`: the chat helper keeps its slot).
    Raises ConfigError naming the first bad request (`Engine.check_request`) before anything is computed."""
    streams = [StopScanner(tokenizer, r.stop) for r in requests]
    waiting = list(range(len(requests)))
    owner: dict[int, int] = {}
    for i, r in enumerate(requests):  # every request checked before any is computed
        engine.check_request(r.prompt, r.sampling, r.max_new_tokens, r.stop_token_ids, where=f"request {i}")
        if isinstance(r.stop, str) or not all(isinstance(s, str) for s in r.stop):
            raise ConfigError(f"request {i}: stop must be a list of strings, got {r.stop!r}")

    def finish(i: int, slot: int) -> None:
        if on_text is not None:
            rest = streams[i].delta(final=True)
            if rest:
                on_text(i, rest)
        if requests[i].slot is None:
            engine.free(slot)
        else:
            engine.stop(slot)
        owner.pop(slot, None)
        if on_done is not None:
            on_done(i, _completion(streams[i]))

    def take(events: list[Event]) -> None:
        for e in events:
            i = owner[e.slot]
            stopped = streams[i].add(e)
            if stopped or e.finish is not None:
                finish(i, e.slot)
            elif on_text is not None:
                d = streams[i].delta(final=False)
                if d:
                    on_text(i, d)

    def fill() -> None:
        free = set(engine.free_slots())
        named = [i for i in waiting if requests[i].slot is not None and requests[i].slot not in owner]
        anyslot = [i for i in waiting if requests[i].slot is None]
        batch = named + anyslot[:max(0, len(free) - len(named))]
        for i in batch:
            waiting.remove(i)
        if not batch:
            return
        rs = [requests[i] for i in batch]
        events = engine.add_many([r.prompt for r in rs], [r.sampling for r in rs],
                                 max_new_tokens=[r.max_new_tokens for r in rs],
                                 stop_token_ids=[r.stop_token_ids for r in rs],
                                 slots=_slots_for(engine, rs, free))
        for i, e in zip(batch, events):
            owner[e.slot] = i
        take(events)

    fill()
    while owner or waiting:
        take(engine.step(check_every))
        fill()
    return [_completion(s) for s in streams]


def _slots_for(engine: Engine, requests: Sequence[Request], free: set) -> list[int]:
    """The named slots, and for the others the free slot sharing the longest prefix with the prompt."""
    taken = {r.slot for r in requests if r.slot is not None}
    pool = sorted(free - taken)
    out = []
    for r in requests:
        if r.slot is not None:
            out.append(r.slot)
            continue
        best = max(pool, key=lambda s: engine.shared_prefix(s, r.prompt))
        pool.remove(best)
        out.append(best)
    return out


def render_chat(tokenizer, messages: Sequence[dict], where: str = "messages") -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, ending in the assistant's turn prompt."""
    if tokenizer.chat_template is None:
        raise FileFormatError(f"{where}: the tokenizer has no chat template; give a chat model or plain prompts")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Chat:
    """A multi-turn conversation on one slot of `engine`: each `send` renders the whole conversation through the
    chat template and the engine computes only what its slot does not hold yet (the new messages), so turns cost
    what they add. The slot stays reserved until `close()`."""

    def __init__(self, engine: Engine, tokenizer, *, system: str | None = None, sampling: SamplingParams = GREEDY,
                 max_new_tokens: int = 256, stop: Sequence[str] = ()):
        self.engine, self.tokenizer = engine, tokenizer
        self.sampling, self.max_new_tokens, self.stop = sampling, max_new_tokens, tuple(stop)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.slot: int | None = None
        self.last: Completion | None = None

    def send(self, text: str, on_text: Callable[[str], Any] | None = None) -> str:
        """Add the user's `text`, generate the reply (streamed to `on_text` as it comes), return it."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = render_chat(self.tokenizer, messages)
        if self.slot is None:
            free = self.engine.free_slots()
            if not free:
                raise ConfigError("no free slot for a chat; free one or make the engine with more slots")
            self.slot = max(free, key=lambda s: self.engine.shared_prefix(s, prompt))
        request = Request(prompt, self.sampling, self.max_new_tokens, self.stop, slot=self.slot)
        out = run(self.engine, self.tokenizer, [request],
                  on_text=None if on_text is None else (lambda _, d: on_text(d)))[0]
        self.last = out
        reply = out.text.strip()
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply

    def close(self) -> None:
        """Free the conversation's slot."""
        if self.slot is not None:
            self.engine.free(self.slot)
            self.slot = None
