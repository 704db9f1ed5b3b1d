"""The progress line of long runs: images described (`netvlad-client`), bytes downloaded (fetch).

Three modes: "bar" redraws one line in place (a terminal, or when asked for), "lines" writes a
line each time another tenth is done (logs and pipes get a readable record, not carriage
returns), "off" writes nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

MODES = ("bar", "lines", "off")
BAR_WIDTH = 30
REDRAW_SECONDS = 0.1


def human_bytes(n: float) -> str:
    """A byte count with a binary unit, e.g. 1.07 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: float) -> str:
    return f"{n:.0f}"


def choose_mode(setting: str, stream: TextIO, worth_it: bool = True) -> str:
    """The mode for a --progress setting: auto draws a bar on a terminal when `worth_it`."""
    if setting == "always":
        return "bar"
    if setting == "auto" and worth_it and stream.isatty():
        return "bar"
    return "off"


class Progress:
    """Counts work done towards `total` (None: unknown) and shows it on `stream`."""

    def __init__(
        self,
        total: int | None,
        *,
        mode: str = "bar",
        stream: TextIO | None = None,
        unit: str = "images",
        label: str = "",
        start: int = 0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
        self.total = total
        self.mode = "off" if total == 0 else mode
        self.stream = stream or sys.stderr
        self.unit, self.label = unit, label
        self._amount: Callable[[float], str] = human_bytes if unit == "bytes" else _count
        self.start = self.done = start
        self._t0 = time.monotonic()
        self._drawn_at = -REDRAW_SECONDS
        self._tenth = -1
        self._written = -1  # `done` at the last line written in "lines" mode

    def advance(self, count: int) -> None:
        """Count `count` more units and redraw when due (at most ten times a second)."""
        self.done += count
        now = time.monotonic()
        if self.mode == "bar":
            finished = self.total is not None and self.done >= self.total
            if now - self._drawn_at >= REDRAW_SECONDS or finished:
                self._drawn_at = now
                self.stream.write("\r\x1b[K" + self.line())
                self.stream.flush()
        elif self.mode == "lines" and self.total:
            tenth = 10 * self.done // self.total
            if tenth != self._tenth:
                self._tenth, self._written = tenth, self.done
                self.stream.write(self.line() + "\n")
                self.stream.flush()

    def line(self) -> str:
        """The status text, e.g. "[#####     ] 50/100 images  50.0% 12.5/s ETA 4s"."""
        elapsed = time.monotonic() - self._t0
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        prefix = f"{self.label}: " if self.label else ""
        unit = "" if self.unit == "bytes" else f" {self.unit}"
        rate_text = f"{self._amount(rate)}/s" if self.unit == "bytes" else f"{rate:.1f}/s"
        if not self.total:
            return f"{prefix}{self._amount(self.done)}{unit}  {rate_text}"
        filled = min(BAR_WIDTH, int(BAR_WIDTH * self.done / self.total))
        bar = "#" * filled + " " * (BAR_WIDTH - filled)
        left = self.total - self.done
        eta = f" ETA {left / rate:.0f}s" if rate > 0 and left > 0 else ""
        return (f"{prefix}[{bar}] {self._amount(self.done)}/{self._amount(self.total)}{unit} "
                f"{100 * self.done / self.total:5.1f}% {rate_text}{eta}")

    def close(self) -> None:
        """Show the final state and end the line, so later messages start on their own line."""
        if self.mode == "bar" and (self.done > self.start or self._drawn_at > 0):
            self.stream.write("\r\x1b[K" + self.line() + "\n")
        elif self.mode == "lines" and self._written != self.done:
            self.stream.write(self.line() + "\n")
        else:
            return
        self.stream.flush()
