"""Console progress with an ETA, used by training (one line per logged step) and by
evaluation (one line redrawn in place on a terminal, whole lines elsewhere).

Not tqdm, on purpose: the training log is one record per logged step (loss, lr, tok/s,
ETA) that files and pipes keep line by line, and a redirected evaluation prints whole lines
every few seconds; tqdm draws one bar redrawn with carriage returns, which a log file
keeps as one long line. Only process 0 prints."""
from __future__ import annotations

import sys
import time

import jax


def format_duration(seconds: float) -> str:
    """"4m05s", or "1h02m" from an hour on."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """`label done/total | text | ETA` on process 0's stream.

    every_line=True prints a whole line at every update (the training log). Otherwise the
    line is redrawn in place when the stream is a terminal, and when it is not (a file, a
    pipe) a whole line is printed at most every `interval_s` seconds, and at the end. The
    ETA extrapolates the rate since the clock started: at construction, or at
    `restart_clock` (e.g. after a compile that should not count).
    """

    def __init__(self, total: int, label: str, *, every_line: bool = False,
                 interval_s: float = 10.0, stream=None, enabled: bool | None = None):
        self.total, self.label = total, label
        self.stream = sys.stdout if stream is None else stream
        self.enabled = (jax.process_index() == 0 if enabled is None else enabled) and total > 0
        self.in_place = not every_line and self.stream.isatty()
        self.interval_s = 0.0 if every_line else interval_s
        self.done = 0
        self._last_print = -float("inf")
        self.restart_clock(0)

    def restart_clock(self, done: int) -> None:
        """Measure the rate from now, when `done` units are done."""
        self._first = (time.time(), done)

    def eta_seconds(self, done: int, now: float) -> float | None:
        if done <= self._first[1]:
            return None
        rate = (now - self._first[0]) / (done - self._first[1])   # seconds per unit
        return (self.total - done) * rate

    def advance(self, text: str = "") -> None:
        """One more unit done."""
        self.update(self.done + 1, text)

    def update(self, done: int, text: str = "") -> None:
        self.done = done
        if not self.enabled:
            return
        now = time.time()
        finished = done >= self.total
        if not (self.in_place or finished or now - self._last_print >= self.interval_s):
            return
        self._last_print = now
        eta = self.eta_seconds(done, now)
        width = len(str(self.total))
        line = " | ".join(part for part in (
            f"{self.label} {done:>{width}}/{self.total}", text,
            f"ETA {format_duration(eta)}" if eta is not None else "") if part)
        if self.in_place:
            end = "\n" if finished else ""
            self.stream.write(f"\r{line:<100}{end}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
