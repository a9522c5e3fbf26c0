"""Progress of the CLI's long commands (build, verify --against-fa4, pack, push, pull) on stderr:
a bar with counts and ETA (tqdm) on a terminal; plain lines otherwise (a log file or CI output
gets one line per step, never carriage returns).

tqdm comes with the cli extra; without it the plain lines are printed on a terminal too.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any

#: Seconds between two plain progress lines of steps that print no line of their own.
PLAIN_EVERY_S = 5.0


def _eta(seconds: float) -> str:
    """``1:02:03`` / ``2:03``: what is left."""
    s = int(seconds + 0.5)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts ``total`` steps of ``what``. :meth:`step` advances by one and (with ``line``) says
    what the step did: above the bar on a terminal, as ``[i/n] line (ETA m:ss)`` otherwise.
    ``enabled`` False prints nothing (a quiet command). ``lines`` False: steps say nothing of
    their own (blobs packed, entries pushed), so the plain form prints ``[i/n] what (ETA)`` at
    most every :data:`PLAIN_EVERY_S` seconds, and the last step."""

    def __init__(
        self,
        total: int,
        what: str,
        *,
        enabled: bool = True,
        stream: IO[str] | None = None,
        lines: bool = True,
        bar: bool | None = None,
    ):
        self.total = total
        self.what = what
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.lines = lines
        self.done = 0
        self._t0 = self._shown = time.monotonic()
        self._bar: Any = None
        if self.enabled and (bar if bar is not None else _is_terminal(self.stream)):
            try:
                from tqdm import tqdm
            except ImportError:  # an older cli install: plain lines
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=what, unit="", file=self.stream, dynamic_ncols=True, leave=False)

    def eta(self) -> str:
        """The time left at the mean pace so far (``?`` before the first step)."""
        if not self.done:
            return "?"
        return _eta((time.monotonic() - self._t0) / self.done * (self.total - self.done))

    def step(self, line: str | None = None, n: int = 1) -> None:
        """``n`` more steps done; ``line`` says what the (last) step did."""
        self.done += n
        if not self.enabled:
            return
        if self._bar is not None:
            if line is not None and self.lines:
                self._bar.write(line, file=self.stream)
            self._bar.update(n)
            return
        now = time.monotonic()
        if not self.lines and self.done < self.total and now - self._shown < PLAIN_EVERY_S:
            return
        self._shown = now
        width = len(str(self.total))
        text = line if line is not None else self.what
        tail = f" (ETA {self.eta()})" if self.done < self.total else ""
        self.stream.write(f"[{self.done:>{width}}/{self.total}] {text}{tail}\n")
        self.stream.flush()

    def note(self, line: str) -> None:
        """A line that is no step (an error's detail), kept clear of the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        """Take the bar off the terminal (the command's summary follows)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def callback(self) -> Any:
        """A ``progress(done, total)`` callable for library functions that count their own steps
        (pack, push, pull, the FA4 comparison): advances to ``done``."""

        def advance(done: int, total: int, line: str | None = None) -> None:
            if total != self.total:
                self.total = total
                if self._bar is not None:
                    self._bar.total = total
                    self._bar.refresh()
            if done > self.done:
                self.step(line, done - self.done)

        return advance


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or no such method (a test's buffer)
        return False
