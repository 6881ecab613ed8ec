"""Progress of long work: the callbacks the library calls, and plain progress lines for logs.

The library never prints: it calls a `Progress`. On a terminal the CLI draws a rich bar; otherwise (stderr sent to
a file, a batch scheduler's log) it writes `ProgressLines`: at most one line every 10 s while work advances, at least
one a minute even when a single batch takes longer, and a line for each note (loading a checkpoint). Nothing is
written in the first 10 s: a short run, or one that stops at once on bad input, leaves only its result or its one
`error:` line; the lines held back come out together when the first progress line does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

MIN_INTERVAL_S = 10.0
"""No two progress lines closer than this."""
MAX_INTERVAL_S = 60.0
"""A line at least this often, progress or not."""


@dataclass
class Progress:
    """Callbacks a front end may pass to follow long work."""

    start: Callable[[int, int], None] = lambda total_steps, done_steps: None
    advance: Callable[[int, int], None] = lambda steps, tokens: None
    note: Callable[[str], None] = lambda message: None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """Plain progress lines through `write`: steps done/total, tokens/s, time left. `clock` is injectable so the
    throttling can be tested without sleeping; `tick()` is what a heartbeat calls between advances."""

    def __init__(self, write: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.clock = write, clock
        self.total = self.done = self.resumed = self.tokens = 0
        self.started = self.last_line = None
        self.held: list[str] | None = []
        """Lines of the first MIN_INTERVAL_S, written with the first progress line; None once written."""
        self.lock = threading.Lock()

    def start(self, total_steps: int, done_steps: int) -> None:
        with self.lock:
            self.total, self.done = total_steps, done_steps
            self.resumed = done_steps
            self.started = self.last_line = self.clock()
            resumed = f", {done_steps:,} resumed from a previous run" if done_steps else ""
            self._write(f"rescoring {total_steps:,} steps{resumed}")

    def advance(self, steps: int, tokens: int) -> None:
        with self.lock:
            self.done += steps
            self.tokens += tokens
            self._line(MIN_INTERVAL_S)

    def tick(self) -> None:
        with self.lock:
            self._line(MAX_INTERVAL_S)

    def note(self, message: str) -> None:
        with self.lock:
            self._write(message)

    def _write(self, line: str) -> None:
        if self.held is None:
            self.write(line)
        else:
            self.held.append(line)

    def _line(self, interval: float) -> None:
        now = self.clock()
        if self.started is None or now - self.last_line < interval:
            return
        self.last_line = now
        for line in self.held or []:
            self.write(line)
        self.held = None
        elapsed = now - self.started
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        steps_done = self.done - self.resumed
        left = (f"{_duration(elapsed / steps_done * (self.total - self.done))} left" if steps_done
                else "time left unknown")
        percent = self.done / self.total if self.total else 1.0
        self.write(f"{self.done:,}/{self.total:,} steps ({percent:.0%}), {rate:,.0f} tokens/s, {left}")

    def callbacks(self) -> Progress:
        return Progress(start=self.start, advance=self.advance, note=self.note)


class Heartbeat:
    """Calls `tick` every few seconds on a daemon thread until stopped (so a long batch still shows a line)."""

    def __init__(self, tick: Callable[[], None], every: float = 5.0) -> None:
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(tick, every), daemon=True)

    def _run(self, tick: Callable[[], None], every: float) -> None:
        while not self.stopped.wait(every):
            tick()

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()
