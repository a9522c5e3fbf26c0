"""The ``fa4aot`` logger hierarchy (``fa4aot.runtime.loader``, ``fa4aot.cli``, ...) and its set-up.

A library leaves logging to its application: without ``$FA4AOT_LOG`` the runtime only creates
loggers (Python shows their warnings through logging's last resort). With it, the runtime sets
the level of the ``fa4aot`` logger and, unless the application configured logging itself, prints
the records to stderr. The CLI always prints them, at the level -v/-q (or ``$FA4AOT_LOG``) give.

Standard library only (the runtime imports it).
"""

from __future__ import annotations

import logging
import sys
from typing import IO

from fa4aot.core import env

#: The root of fa4aot's loggers.
ROOT = "fa4aot"


class _Format(logging.Formatter):
    """``fa4aot: message``; warnings and worse carry their level (``fa4aot: warning: ...``),
    debug records their logger."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info and record.levelno <= logging.DEBUG:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"fa4aot: {record.levelname.lower()}: {msg}"
        if record.levelno <= logging.DEBUG:
            return f"fa4aot: debug: [{record.name}] {msg}"
        return f"fa4aot: {msg}"


class _Handler(logging.StreamHandler):
    """fa4aot's own stderr handler (recognised so it is installed once). Writes to the
    ``sys.stderr`` of the moment: tests and the CLI's runner swap it."""

    def __init__(self, stream: IO[str] | None = None):
        super().__init__(stream)
        self._fixed = stream is not None

    def emit(self, record: logging.LogRecord) -> None:
        if not self._fixed:
            self.stream = sys.stderr
        super().emit(record)


def get(name: str) -> logging.Logger:
    """The logger of an fa4aot module (``__name__``), or a child of ``fa4aot`` by short name."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def configure(level: int, stream: IO[str] | None = None) -> None:
    """Set the ``fa4aot`` logger's level and give it one stderr handler (the CLI)."""
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(isinstance(h, _Handler) for h in root.handlers):
        handler = _Handler(stream)
        handler.setFormatter(_Format())
        root.addHandler(handler)


def unconfigure() -> None:
    """Undo :func:`configure` (the CLI, when a command ends: a test runs many in one process, and
    the runtime it then opens should log as a library does)."""
    root = logging.getLogger(ROOT)
    for h in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(h)
    root.setLevel(logging.NOTSET)


def configure_from_env() -> None:
    """The runtime's set-up: with ``$FA4AOT_LOG`` set, that level, and a stderr handler unless the
    application configured logging (its handlers then print fa4aot's records). A bad level name
    is reported once and ignored: logging must never stop the runtime."""
    try:
        level = env.log_level()
    except ValueError as e:
        logging.getLogger(ROOT).warning("%s; ignored", e)
        return
    if level is None:
        return
    if logging.getLogger().handlers:
        logging.getLogger(ROOT).setLevel(level)
        return
    configure(level)
