"""Graceful stop on SIGTERM / SIGINT: the training loop polls a flag, saves a checkpoint and returns.

    with StopSignal() as stop:
        for step in ...:
            ...
            if stop.requested:
                ckpt.save(step, state, extra=...)
                break

In a multi-host run every process must stop at the same step, or the others wait forever in the next collective:
`poll(step)` ors the flag over all processes (one all-gather of a few bytes every `every` steps) and returns the
agreed answer, so a signal that reached one process stops all of them after the same step.

SIGTERM (a scheduler's preemption notice) and the first Ctrl-C only set `stop.requested`. A second Ctrl-C does what
Ctrl-C did before (`KeyboardInterrupt` by default), for a person who wants out now. Further SIGTERMs are ignored while
the stop is under way: launchers often forward one SIGTERM to every process of a group, and dying on the second one
would lose the checkpoint being written. The previous handlers come back on exit.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax

from jaxft.parallel.distributed import gather_ints


class StopSignal:
    """Context manager turning SIGTERM and SIGINT into a polled flag, `requested`.

    `signal_name` is the name of the first signal received ("SIGTERM"), None before any.
    Install it from the main thread (Python delivers signals there only).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT), every: int = 1):
        if every < 1:
            raise ValueError(f"StopSignal: every={every} must be >= 1")
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.every = every
        self.requested = False
        self.signal_name: str | None = None
        self._signum = 0
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            previous = self._previous.get(signal.SIGINT, signal.default_int_handler)
            if callable(previous):
                previous(signum, frame)
                return
            if previous == signal.SIG_DFL:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.raise_signal(signal.SIGINT)
            return
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            self._signum = signum

    def poll(self, step: int) -> bool:
        """True when a stop was requested on this process or, in a multi-host run, on any process; every process
        must call it after every step. With several processes they compare flags after the steps that are
        multiples of `every` (and only then stop); `signal_name` becomes the signal another process received."""
        if jax.process_count() == 1:
            return self.requested
        if step % self.every:
            return False
        got = gather_ints([int(self._signum)])
        if got.max() > 0:
            self.requested = True
            self.signal_name = self.signal_name or signal.Signals(int(got.max())).name
        return self.requested

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal: enter it in the main thread; Python runs signal handlers only there")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
