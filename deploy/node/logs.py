"""Structured logging: one JSON object per line per event.

Every line has ``ts`` (UTC ISO 8601), ``level`` and ``event``; events about a study carry
``study_uid`` and ``calling_aet``. Lines go to stderr and, when configured, to a log file, so a
log shipper (journald, Fluent Bit, ...) can index them without parsing free text.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

_lock = threading.Lock()
_streams: list[TextIO] = [sys.stderr]


class _JSONHandler(logging.Handler):
    """Turns library log records (pynetdicom) into JSON lines too, so the log stays one format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log_event("library_log", level=record.levelname.lower(), logger=record.name,
                      message=record.getMessage()[:500])
        except Exception:
            pass


def configure(log_file: Path | None = None, stderr: bool = True) -> None:
    """Choose where lines go (stderr and / or an append-only file); capture pynetdicom's warnings."""
    global _streams
    streams: list[TextIO] = [sys.stderr] if stderr else []
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        streams.append(open(log_file, "a", encoding="utf-8", buffering=1))
    _streams = streams
    logging.captureWarnings(True)
    for name in ("pynetdicom", "pydicom", "py.warnings"):
        lib = logging.getLogger(name)
        lib.handlers = [h for h in lib.handlers if not isinstance(h, _JSONHandler)]
        handler = _JSONHandler(level=logging.WARNING)
        lib.addHandler(handler)
        lib.setLevel(logging.WARNING)
        lib.propagate = False


def log_event(event: str, level: str = "info", **fields: Any) -> None:
    """Write one JSON line: {"ts", "level", "event", **fields} (None values are left out)."""
    record = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
              "level": level, "event": event}
    record.update({k: v for k, v in fields.items() if v is not None})
    line = json.dumps(record, default=str, ensure_ascii=True)
    with _lock:
        for stream in _streams:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError):
                pass
