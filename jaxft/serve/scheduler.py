"""The server's scheduler: one background thread owns the generation engine and the adapter stack.

Requests (from any thread) wait in a queue; the loop admits the waiting ones into free engine slots together, one
prefill pass per prompt-length bucket (each row names its adapter slot, -1 for the base), runs decode steps over
every active slot at once (rows on different adapters share one multi-adapter pass: `jaxft.peft.multi`), and hands
each request its tokens and text as they come through a callback (stop strings: `jaxft.generate.StopScanner`).
Adapter loads and unloads run in the same thread between passes, so the stack's arrays never change under a
running step; the engine's parameters are rebound (same shapes: no recompilation).

Unloading an adapter that requests use (running or already accepted) takes it out of service at once (new
requests for it are refused) and frees its stack slot when the last of them finishes, as vLLM does; until then
the name cannot be loaded again.

A request the engine refuses (which the HTTP layer's checks should have caught) fails alone: its callback gets the
error, the other rows go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Any, Callable, Sequence

from jaxft.errors import ConfigError, JaxftError
from jaxft.generate.engine import Engine, Event, length_bucket
from jaxft.generate.sampling import SamplingParams
from jaxft.generate.stops import StopScanner
from jaxft.peft.multi import BASE, AdapterStack, bind_stack


@dataclasses.dataclass
class Job:
    """One sequence to generate. `out` holds what it produced so far (tokens, logprobs, text cut at a stop
    string, finish reason). `on_event(job, delta_text, event_or_None, error_or_None)` is called from the scheduler
    thread: with each new piece of text, and a last time with `job.out.finish` set (or an error)."""

    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    adapter: str | None
    out: StopScanner
    on_event: Callable[..., Any]
    cancelled: bool = False


@dataclasses.dataclass
class Metrics:
    """Counters shown at /metrics. decode_passes: engine decode calls; multi_row_passes: those with >= 2 active rows;
    multi_adapter_passes: those whose active rows used >= 2 different adapters (the base counts as one);
    max_rows: the most rows one pass decoded. prefill_passes: engine prefill calls (requests admitted together share
    one per prompt-length bucket); prefill_rows: requests they prefilled; max_prefill_rows: the most in one."""

    requests: int = 0
    decode_passes: int = 0
    multi_row_passes: int = 0
    multi_adapter_passes: int = 0
    max_rows: int = 0
    prefill_passes: int = 0
    prefill_rows: int = 0
    max_prefill_rows: int = 0
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
        self._draining: frozenset[str] = frozenset()  # unloaded adapters that accepted requests still use
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

    def served(self) -> list[str]:
        """The adapters new requests may name: loaded and not being unloaded (safe from any thread)."""
        draining = self._draining
        return [n for n in list(self.stack.names) if n not in draining]

    def waiting(self) -> int:
        """Requests submitted and not yet admitted."""
        return self._jobs.qsize() + len(self._waiting)

    def rebind(self) -> None:
        """Give the engine the stack's current arrays (after `stack.add` / `remove`; same shapes, no recompile)."""
        self.engine.params = bind_stack(self.base_params, self.stack.arrays)

    # ---- adapter changes (run them through `call`) ----
    def load(self, name: str, spec: Any, tree: dict) -> int:
        """Write an adapter into a free stack slot; its stack slot. Scheduler thread only."""
        if name in self._draining:
            raise ConfigError(f"adapter '{name}' is being unloaded; requests still use it: load it again when they "
                              "finish, or under another name")
        slot = self.stack.add(name, spec, tree, self.base_params)
        self.rebind()
        return slot

    def unload(self, name: str) -> int:
        """Take `name` out of service now; free its stack slot once no accepted request uses it (at once when none
        does). Returns the requests still using it. Scheduler thread only."""
        if name not in self.served():
            raise ConfigError(f"adapter '{name}' is not loaded (loaded: {', '.join(self.served()) or 'none'})")
        self._pull_jobs()  # requests accepted before the unload finish on the adapter
        self._draining = self._draining | {name}
        users = sum(j.adapter == name for j in list(self._owner.values()) + self._waiting)
        self._retire()
        return users

    def _retire(self) -> None:
        """Free the stack slots of unloaded adapters no request uses any more."""
        if not self._draining:
            return
        used = {j.adapter for j in list(self._owner.values()) + self._waiting}
        for name in self._draining - used:
            slot = self.stack.remove(name)
            self.engine.forget(slot)  # the slot's id will mean another adapter: drop caches computed with it
            self._draining = self._draining - {name}
            self.rebind()

    # ---- the loop ----
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._run_calls()
            self._pull_jobs()
            self._admit()
            if self._owner:
                self._step()
            elif not self._waiting:
                self._wake.wait(0.05)
                self._wake.clear()

    def _pull_jobs(self) -> None:
        while True:
            try:
                self._waiting.append(self._jobs.get_nowait())
            except queue.Empty:
                return

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
        """Admit waiting jobs into the free slots: each checked alone (a bad one fails alone), then prefilled
        together, one `add_many` per prompt-length bucket."""
        free = len(self.engine.free_slots())
        batch: list[tuple[Job, int]] = []
        while self._waiting and len(batch) < free:
            job = self._waiting.pop(0)
            if job.cancelled:
                continue
            try:
                slot_id = BASE if job.adapter is None else self.stack.slot(job.adapter)
                self.engine.check_request(job.prompt, job.sampling, job.max_tokens)
            except JaxftError as e:
                job.on_event(job, "", None, e)
                continue
            batch.append((job, slot_id))
        groups: dict[int, list[tuple[Job, int]]] = {}
        for job, slot_id in batch:
            groups.setdefault(length_bucket(len(job.prompt)), []).append((job, slot_id))
        for group in groups.values():
            jobs = [j for j, _ in group]
            try:
                events = self.engine.add_many([j.prompt for j in jobs], [j.sampling for j in jobs],
                                              max_new_tokens=[j.max_tokens for j in jobs],
                                              adapter_ids=[a for _, a in group])
            except JaxftError as e:
                for j in jobs:
                    j.on_event(j, "", None, e)
                continue
            m = self.metrics
            m.requests += len(jobs)
            m.prompt_tokens += sum(len(j.prompt) for j in jobs)
            m.prefill_passes += 1
            m.prefill_rows += len(jobs)
            m.max_prefill_rows = max(m.max_prefill_rows, len(jobs))
            for job, event in zip(jobs, events):
                self._owner[event.slot] = job
            for event in events:
                self._take(event)
        self._retire()

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
        self._retire()

    def _take(self, event: Event) -> None:
        job = self._owner[event.slot]
        out = job.out
        before = len(out.tokens)
        stopped = out.add(event)
        self.metrics.generated_tokens += len(out.tokens) - before
        finished = stopped or out.finish is not None
        delta = out.delta(final=finished)
        if finished:
            self._release(event.slot)
            self._retire()  # before the client hears it is done: a reload right after must find the name free
        job.on_event(job, delta, event, None)

    def _release(self, slot: int) -> None:
        self._owner.pop(slot, None)
        self.engine.free(slot)
