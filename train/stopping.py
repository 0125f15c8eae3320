"""Stopping a run cleanly: SIGTERM (a preemption notice) and a first SIGINT (Ctrl-C) ask
the run to stop after the step it is in, with a checkpoint of that step; a second SIGINT
exits at once. With several processes, every process stops at the same step: the flags
are combined across processes after each step."""
from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np


class StopSignals:
    """A context that catches SIGTERM and SIGINT (in the main thread; elsewhere it catches
    nothing). `requested()` -> the signal's name once any process received one, else None."""

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def _handle(self, number, _frame):
        name = signal.Signals(number).name
        if self.received == "SIGINT" and name == "SIGINT":
            print("second SIGINT: exiting at once (no checkpoint)", file=sys.stderr, flush=True)
            os._exit(130)
        if self.received is None:
            self.received = name
            print(f"{name}: stopping after this step with a checkpoint (SIGINT again to "
                  "exit at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *_):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        return False

    def requested(self) -> str | None:
        """The name of the signal that stops the run, agreed by every process."""
        if jax.process_count() == 1:
            return self.received
        from jax.experimental import multihost_utils
        names = ("SIGTERM", "SIGINT")
        local = np.int32(0 if self.received is None else 1 + names.index(self.received))
        agreed = int(np.max(multihost_utils.process_allgather(local)))
        return None if agreed == 0 else names[agreed - 1]
