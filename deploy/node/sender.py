"""Delivery: C-STORE every result file to every destination, at least once.

The sender thread takes the deliveries that are due, groups them by destination, opens one
association per destination (presentation contexts from the files' SOP classes and transfer
syntaxes), sends each file as stored, and records the outcome in the queue. A failure (no
association, rejection, abort, timeout, a failure status) schedules the next attempt after
min(backoff_base * 2**(n-1), backoff_max) seconds; with ``retry.max_attempts`` set the delivery
gives up after that many attempts, otherwise it retries until delivered. A delivery is marked
delivered only after the destination answered Success (or a Warning status), so a crash between
sending and recording means the file is sent again: at-least-once; the results carry stable UIDs,
so a PACS stores a re-sent instance once.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from .config import Destination, NodeConfig
from .logs import log_event
from .queue import Queue
from .spool import Spool

#: Success and the Storage warnings (coercion, elements discarded, data set does not match SOP class).
OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
MAX_CONTEXTS = 128


class Sender:
    """The delivery thread."""

    def __init__(self, cfg: NodeConfig, spool: Spool, queue: Queue,
                 clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.spool = spool
        self.queue = queue
        self.clock = clock
        self.destinations = {d.name: d for d in cfg.destinations}
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were attempted."""
        due = self.queue.due_deliveries(self.clock())
        by_dest: dict[str, list[Any]] = defaultdict(list)
        for row in due:
            by_dest[row["destination"]].append(row)
        for name, rows in by_dest.items():
            dest = self.destinations.get(name)
            if dest is None:
                for row in rows:
                    self._failed(row, f"destination {name} is no longer in the config", give_up=True)
                continue
            for start in range(0, len(rows), MAX_CONTEXTS // 3):
                self._send(dest, rows[start:start + MAX_CONTEXTS // 3])
        return len(due)

    def _send(self, dest: Destination, rows: list[Any]) -> None:
        ae = AE(ae_title=self.cfg.ae_title)
        a = self.cfg.association
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (a.acse_timeout, a.dimse_timeout,
                                                                 a.network_timeout)
        ae.connection_timeout = a.acse_timeout
        pairs = {(r["sop_class_uid"], r["transfer_syntax"]) for r in rows}
        for sop_class_uid in sorted({p[0] for p in pairs}):
            syntaxes = [ts for c, ts in pairs if c == sop_class_uid]
            for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                if ts not in syntaxes:
                    syntaxes.append(ts)
            ae.add_requested_context(sop_class_uid, syntaxes)
        tls_args = None
        if dest.tls and self.cfg.tls is not None:
            tls_args = (self.cfg.tls.client_context(), None)
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
        except Exception as exc:
            for row in rows:
                self._failed(row, f"cannot connect to {dest.name}: {type(exc).__name__}: {exc}")
            return
        if not assoc.is_established:
            if assoc.is_rejected:
                why = (f"{dest.name} rejected the association (is our AE title "
                       f"{self.cfg.ae_title} configured there?)")
            else:
                why = f"no association with {dest.name} (connection refused, network error or abort)"
            for row in rows:
                self._failed(row, why)
            return
        try:
            for row in rows:
                if not assoc.is_established:
                    self._failed(row, f"association to {dest.name} was lost")
                    continue
                path = self.spool.root / row["result_path"]
                if not path.is_file():
                    self._failed(row, f"result file is missing: {row['result_path']}", give_up=True)
                    continue
                try:
                    status = assoc.send_c_store(Path(path))
                except Exception as exc:
                    self._failed(row, f"C-STORE to {dest.name} failed: {type(exc).__name__}: {exc}")
                    continue
                code = getattr(status, "Status", None) if status else None
                if code in OK_STATUSES:
                    self.queue.delivery_succeeded(row["id"], self.clock())
                    log_event("delivered", study_uid=row["study_uid"], calling_aet=row["calling_aet"],
                              job_id=row["job_id"], destination=dest.name,
                              sop_instance_uid=row["sop_instance_uid"], attempt=row["attempts"] + 1)
                elif code is None:
                    self._failed(row, f"no C-STORE response from {dest.name} (timeout or abort)")
                else:
                    self._failed(row, f"{dest.name} answered C-STORE status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()

    def _failed(self, row: Any, error: str, give_up: bool = False) -> None:
        now = self.clock()
        attempts = row["attempts"] + 1
        policy = self.cfg.retry
        if give_up or (policy.max_attempts is not None and attempts >= policy.max_attempts):
            next_at = None
        else:
            next_at = now + policy.delay_after(attempts)
        self.queue.delivery_failed(row["id"], error, next_at, now)
        log_event("delivery_failed", level="error" if next_at is None else "warning",
                  study_uid=row["study_uid"], calling_aet=row["calling_aet"], job_id=row["job_id"], destination=row["destination"],
                  sop_instance_uid=row["sop_instance_uid"], attempt=attempts, error=error,
                  retry_in_s=None if next_at is None else round(next_at - now, 3))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as exc:
                log_event("sender_error", level="error", error=f"{type(exc).__name__}: {exc}")
            nxt = self.queue.next_delivery_time()
            wait = self.cfg.poll_seconds if nxt is None else max(0.05, min(nxt - self.clock(), 5.0))
            self.wake.wait(wait)
            self.wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
