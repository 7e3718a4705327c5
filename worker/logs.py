"""One line per event worth knowing: ``key=value`` text by default, or JSON (``LOG_FORMAT=json``).

No module logs per tick, and none logs a secret: settings print masked, sessions hide their tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=info logger=worker.feed msg="…"``: grep- and logfmt-friendly."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        quoted = json.dumps(message, ensure_ascii=False)
        return f"ts={_timestamp(record)} level={record.levelname.lower()} logger={record.name} msg={quoted}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg`` (and ``exc`` if any)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": _timestamp(record), "level": record.levelname.lower(), "logger": record.name}
        line["msg"] = record.getMessage()
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure(level: str = "INFO", fmt: str = "text", *, force: bool = False) -> None:
    """Route every logger to stderr in ``fmt`` (``text`` or ``json``) at ``level``.

    Like ``logging.basicConfig``, it leaves alone a process whose logging someone else set up (a test
    runner, an embedding application) unless ``force``; it may be called again to change the format.
    """
    root = logging.getLogger()
    mine = [h for h in root.handlers if isinstance(h, _Stderr)]
    if root.handlers and not mine and not force:
        return
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root.handlers[:] = [h for h in root.handlers if h not in mine] + [handler]
    root.setLevel(level)
