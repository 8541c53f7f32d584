"""Progress for the CLI: tqdm's bar in a terminal, plain lines at most every 30 s anywhere else.

tqdm writes every redraw to a file that is not a terminal (CI logs, ``nohup``, a pipe), and a bar per
epoch adds its own start and end lines, so a short sweep fills a log with thousands of lines. Off a
terminal, :class:`ThrottledLines` writes one line when a sweep starts and then one every
``interval`` seconds at most, whatever the number of bars.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable, Optional, TextIO


class ThrottledLines:
    """A tqdm-like bar factory (``progress(total=..., desc=...)``) writing at most a line per ``interval``
    seconds to ``stream``, across all the bars it makes."""

    def __init__(self, stream: TextIO, interval: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.stream, self.interval, self.clock = stream, interval, clock
        self.last: Optional[float] = None

    def __call__(self, total: int = 0, desc: str = "", unit: str = "it", **_: Any) -> "_Bar":
        return _Bar(self, total, desc, unit)

    def maybe_write(self, text: str) -> None:
        now = self.clock()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            self.stream.write(text + "\n")
            self.stream.flush()


class _Bar:
    def __init__(self, lines: ThrottledLines, total: int, desc: str, unit: str) -> None:
        self.lines, self.total, self.desc, self.unit, self.n, self.postfix = lines, total, desc, unit, 0, ""

    def update(self, n: int = 1) -> None:
        self.n += n
        self.lines.maybe_write(f"{self.desc}: {self.n}/{self.total} {self.unit}{self.postfix}")

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cli_progress(stream: TextIO = sys.stderr) -> Callable[..., Any]:
    """The CLI's bar factory for ``stream``: tqdm redrawing in place in a terminal, else :class:`ThrottledLines`."""
    if stream.isatty():
        from tqdm import tqdm
        return functools.partial(tqdm, leave=False, file=stream, dynamic_ncols=True, mininterval=0.1)
    return ThrottledLines(stream)
