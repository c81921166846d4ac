"""The server's scheduler: one background thread owns the generation engine and the adapter stack.

Requests (from any thread) wait in a queue; the loop admits them into free engine slots (each prefill names its
row's adapter slot, -1 for the base), runs decode steps over every active slot at once (rows on different adapters
share one multi-adapter pass: `jaxft.peft.multi`), and hands each request its tokens and text as they come through
a callback. Adapter loads and unloads run in the same thread between passes, so the stack's arrays never change
under a running step; the engine's parameters are rebound (same shapes: no recompilation).

A request the engine refuses (which the HTTP layer's checks should have caught) fails alone: its callback gets the
error, the other rows go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Any, Callable, Sequence

from jaxft.errors import JaxftError
from jaxft.generate.engine import Engine, Event
from jaxft.generate.sampling import SamplingParams
from jaxft.peft.multi import BASE, AdapterStack, bind_stack


@dataclasses.dataclass
class Job:
    """One sequence to generate. `on_event(job, delta_text, event_or_None, error_or_None)` is called from the
    scheduler thread: with each new piece of text, and a last time with `job.finish` set (or an error)."""

    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    adapter: str | None
    stop: Sequence[str]
    on_event: Callable[..., Any]
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish: str | None = None
    cancelled: bool = False


@dataclasses.dataclass
class Metrics:
    """Counters shown at /metrics. decode_passes: engine decode calls; multi_row_passes: those with >= 2 active rows;
    multi_adapter_passes: those whose active rows used >= 2 different adapters (the base counts as one);
    max_rows: the most rows one pass decoded."""

    requests: int = 0
    decode_passes: int = 0
    multi_row_passes: int = 0
    multi_adapter_passes: int = 0
    max_rows: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


class Scheduler:
    """Owns `engine` and `stack`; `submit` jobs and `call` adapter changes from any thread."""

    def __init__(self, engine: Engine, stack: AdapterStack, base_params: Any, tokenizer, *, steps_per_pass: int = 4):
        self.engine, self.stack, self.base_params, self.tokenizer = engine, stack, base_params, tokenizer
        self.steps_per_pass = steps_per_pass
        self.metrics = Metrics()
        self._jobs: queue.Queue = queue.Queue()
        self._calls: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._owner: dict[int, Job] = {}
        self._waiting: list[Job] = []
        self._thread = threading.Thread(target=self._loop, name="jaxft-serve-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)
        self._wake.set()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run `fn()` in the scheduler thread between passes (adapter loads and unloads); a Future of its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((fn, fut))
        self._wake.set()
        return fut

    def adapters_in_use(self) -> set[str]:
        return {j.adapter for j in list(self._owner.values()) + list(self._waiting) if j.adapter is not None}

    def rebind(self) -> None:
        """Give the engine the stack's current arrays (after `stack.add` / `remove`; same shapes, no recompile)."""
        self.engine.params = bind_stack(self.base_params, self.stack.arrays)

    # ---- the loop ----
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_calls()
            while True:
                try:
                    self._waiting.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._admit()
            if self._owner:
                self._step()
            elif not self._waiting:
                self._wake.wait(0.05)
                self._wake.clear()

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(fn())
            except BaseException as e:  # handed to the caller, who turns it into an HTTP error
                fut.set_exception(e)

    def _admit(self) -> None:
        for job in list(self._waiting):
            free = self.engine.free_slots()
            if not free:
                return
            self._waiting.remove(job)
            if job.cancelled:
                continue
            try:
                slot_id = BASE if job.adapter is None else self.stack.slot(job.adapter)
                event = self.engine.add(job.prompt, job.sampling, max_new_tokens=job.max_tokens, adapter_id=slot_id,
                                        slot=free[0])
            except JaxftError as e:
                job.on_event(job, "", None, e)
                continue
            self.metrics.requests += 1
            self.metrics.prompt_tokens += len(job.prompt)
            self._owner[event.slot] = job
            self._take(event)

    def _step(self) -> None:
        rows = [self._owner[s] for s in self.engine.active_slots() if s in self._owner]
        self.metrics.decode_passes += 1
        self.metrics.max_rows = max(self.metrics.max_rows, len(rows))
        if len(rows) >= 2:
            self.metrics.multi_row_passes += 1
        if len({j.adapter for j in rows}) >= 2:
            self.metrics.multi_adapter_passes += 1
        for event in self.engine.step(self.steps_per_pass):
            if event.slot in self._owner:
                self._take(event)
        # rows the engine finished without an event (none expected) or cancelled by their client
        for slot, job in list(self._owner.items()):
            if job.cancelled:
                self._release(slot)

    def _take(self, event: Event) -> None:
        job = self._owner[event.slot]
        job.tokens += event.tokens
        self.metrics.generated_tokens += len(event.tokens)
        if event.logprobs is not None:
            job.logprobs += event.logprobs
        if event.top_logprobs is not None:
            job.top_logprobs += event.top_logprobs
        job.text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        finish = event.finish
        hits = [i for i in (job.text.find(s) for s in job.stop if s) if i >= 0]
        if hits:  # OpenAI's convention: the text ends before the stop string, which is not returned
            job.text, finish = job.text[:min(hits)], "stop"
        end = len(job.text)
        if finish is None:  # hold back a partial UTF-8 character and what could still begin a stop string
            if job.text.endswith("\ufffd"):
                end -= 1
            longest = max((len(s) for s in job.stop if s), default=1)
            end = max(job.sent, end - (longest - 1))
        delta, job.sent = job.text[job.sent:end], max(job.sent, end)
        if finish is not None:
            job.finish = finish
            self._release(event.slot)
        job.on_event(job, delta, event, None)

    def _release(self, slot: int) -> None:
        self._owner.pop(slot, None)
        self.engine.free(slot)
