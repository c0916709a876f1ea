"""Progress lines and the final timing table of a run.

A step (one operator of the app, one subject of a cohort) reports when it ends:
``[3/9] QSM reconstruction  20.3 s``. Lines go to the stream given to :func:`attach` (the app's
terminal, which the framework's own log does not reach: see app/__main__.py); with none attached
nothing is printed, so library use and tests stay silent. :func:`timing_table` renders the steps
seen so far. Operators mark their ``compute`` with :func:`step`.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Callable, TextIO

_lock = threading.Lock()
_stream: TextIO | None = None
_total = 0
_steps: list[tuple[str, float]] = []


def attach(stream: TextIO | None, total_steps: int = 0) -> None:
    """Print progress to ``stream`` (None: stop printing) and forget the steps recorded so far."""
    global _stream, _total
    with _lock:
        _stream, _total = stream, int(total_steps)
        _steps.clear()


def record(name: str, seconds: float) -> None:
    """One finished step: kept for :func:`timing_table` and printed if a stream is attached."""
    with _lock:
        _steps.append((name, float(seconds)))
        if _stream is not None:
            of = f"/{_total}" if _total else ""
            _stream.write(f"[{len(_steps)}{of}] {name:<28s} {seconds:6.1f} s\n")
            _stream.flush()


def steps() -> list[tuple[str, float]]:
    with _lock:
        return list(_steps)


def timing_table(extra: dict[str, dict[str, float]] | None = None) -> str:
    """The steps and their seconds, then each ``extra`` group's sub-steps (e.g. the QSM chain's),
    as aligned text lines ending with the total of the steps."""
    rows = steps()
    lines = [f"{'step':<30s} {'seconds':>8s}"]
    for name, s in rows:
        lines.append(f"{name:<30s} {s:8.1f}")
    lines.append(f"{'total':<30s} {sum(s for _, s in rows):8.1f}")
    for group, parts in (extra or {}).items():
        lines.append(f"{group}: " + ", ".join(f"{k} {float(v):.1f}" for k, v in parts.items()))
    return "\n".join(lines)


def step(name: str) -> Callable:
    """Decorator for an operator's ``compute``: records ``name`` with its seconds when it returns."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            record(name, time.perf_counter() - t)
            return out
        return inner
    return wrap
