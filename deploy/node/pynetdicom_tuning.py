"""Shorter polling delays for the node's own incoming associations (pynetdicom 3.0.4 only).

pynetdicom runs two polling threads per association. The association reactor
(``Association._run_reactor``) sleeps a hard-coded 1 ms before each look at its DIMSE queue, and
the DUL reactor (``DULServiceProvider.run_reactor``) sleeps ``_run_loop_delay`` (1 ms) whenever a
loop found nothing to do. With one C-STORE at a time (storescu, a scanner) these sleeps sit on
the critical path of every instance: request received -> handler -> response sent.

What this module changes, per association and only for associations the node accepts (it binds
an ``EVT_CONN_OPEN`` handler; pynetdicom's classes and modules are not modified, so the node's
sender, tests and any other AE in the process keep pynetdicom's behaviour):

* the association reactor gets its own copy of ``_run_reactor`` whose 1 ms sleep waits on the
  DIMSE message queue's condition instead: it wakes as soon as the DUL thread queues a message,
  and otherwise still polls every 1 ms (release, abort, timeouts) - no extra CPU;
* the DUL reactor gets a copy of ``run_reactor`` whose idle sleep is a ``select`` on the
  association's socket with timeout ``dul_delay`` (default 0.1 ms instead of 1 ms): incoming data
  wakes it at once; an outgoing response waits at most ``dul_delay``. This costs CPU, but only
  while an association is open: an idle open association wakes up to 1/``dul_delay`` times a
  second (measured about 10-13 % of one core more per idle open association at 0.1 ms, see
  deploy/README.md; associations close after ``network_timeout``).

Guard: applied only when pynetdicom's version is exactly :data:`PINNED_VERSION` and the two
functions still have the shape this module relies on (a ``time.sleep`` call, the 1 ms constant,
``_run_loop_delay``). Otherwise :func:`conn_open_handlers` logs one warning and returns no
handler, leaving pynetdicom as it is.
"""

from __future__ import annotations

import select
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import pynetdicom
import pynetdicom.association as _association
import pynetdicom.dul as _dul
import pynetdicom.utils
from pynetdicom import evt

from .logs import log_event

PINNED_VERSION = "3.0.4"
DEFAULT_DUL_DELAY = 0.0001


class _AssociationClock:
    """``time`` for the copied ``Association._run_reactor``: ``sleep`` waits on the DIMSE queue."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        assoc = threading.current_thread()
        q = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
        if q is None:
            time.sleep(seconds)
            return
        with q.not_empty:
            if not q.queue:
                q.not_empty.wait(seconds)


class _DULClock:
    """``time`` for the copied ``DULServiceProvider.run_reactor``: ``sleep`` selects the socket."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        dul = threading.current_thread()
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        try:
            if sock is not None and sock.fileno() >= 0:
                select.select([sock], [], [], seconds)
                return
        except (OSError, ValueError):
            pass
        time.sleep(seconds)


def _copy_with_clock(func: Callable[..., Any], clock: Any) -> Callable[..., Any]:
    """The same function (code, defaults) whose global ``time`` is ``clock``; the module's own
    globals are untouched (the copy gets a shallow copy of them)."""
    glb = dict(func.__globals__)
    glb["time"] = clock
    new = types.FunctionType(func.__code__, glb, func.__name__, func.__defaults__,
                             func.__closure__)
    new.__kwdefaults__ = func.__kwdefaults__
    return new


def unsupported_reason(version: str | None = None) -> str | None:
    """Why the tuning cannot be applied to this pynetdicom, or None when it can."""
    version = pynetdicom.__version__ if version is None else version
    if version != PINNED_VERSION:
        return f"pynetdicom {version} is not the pinned {PINNED_VERSION}"
    reactor = getattr(_association.Association, "_run_reactor", None)
    dul_reactor = getattr(_dul.DULServiceProvider, "run_reactor", None)
    for name, fn in (("Association._run_reactor", reactor),
                     ("DULServiceProvider.run_reactor", dul_reactor)):
        code = getattr(fn, "__code__", None)
        if code is None or "time" not in code.co_names or "sleep" not in code.co_names:
            return f"{name} has no time.sleep call"
    if 0.001 not in reactor.__code__.co_consts:  # type: ignore[union-attr]
        return "Association._run_reactor no longer sleeps 1 ms"
    if "_run_loop_delay" not in dul_reactor.__code__.co_names:  # type: ignore[union-attr]
        return "DULServiceProvider.run_reactor no longer uses _run_loop_delay"
    return None


_FAST_REACTOR = _copy_with_clock(_association.Association._run_reactor, _AssociationClock())
_FAST_DUL_REACTOR = _copy_with_clock(_dul.DULServiceProvider.run_reactor, _DULClock())


def tune_association(assoc: Any, dul_delay: float = DEFAULT_DUL_DELAY) -> None:
    """Give one not-yet-started association the fast reactors (instance attributes only)."""
    assoc._run_reactor = types.MethodType(_FAST_REACTOR, assoc)
    dul = assoc.dul
    dul._run_loop_delay = dul_delay
    if hasattr(dul, "_target") and not dul.is_alive():
        # Thread.run calls self._target, a wrapper around the bound run_reactor.
        dul.run_reactor = types.MethodType(_FAST_DUL_REACTOR, dul)
        dul._target = pynetdicom.utils.make_target(dul.run_reactor)


def conn_open_handlers(enabled: bool = True, dul_delay: float = DEFAULT_DUL_DELAY,
                       version: str | None = None) -> list[tuple[Any, Callable[[Any], None]]]:
    """Event handlers to pass to ``AE.start_server`` that tune each accepted association.

    Empty when ``enabled`` is false, or (with one ``pynetdicom_tuning_skipped`` warning) when
    :func:`unsupported_reason` finds this pynetdicom unsuitable.
    """
    if not enabled:
        return []
    reason = unsupported_reason(version)
    if reason is not None:
        log_event("pynetdicom_tuning_skipped", level="warning", reason=reason)
        return []

    def on_open(event: Any) -> None:
        tune_association(event.assoc, dul_delay)

    return [(evt.EVT_CONN_OPEN, on_open)]
