"""The node: wires spool, queue, Storage SCP, scheduler, workers and sender together.

Start-up order matters for "nothing acknowledged is lost":

1. open the spool, delete partial writes in ``tmp/`` (never acknowledged);
2. open the queue; jobs left 'running' by a crash go back to 'queued' (pending deliveries simply
   stay pending);
3. reconcile: a file under ``instances/`` that the queue does not know (the node died between the
   fsync+rename and the queue commit, so the peer never got Success) is registered, so it is not
   orphaned;
4. only then listen for associations, and start the scheduler, workers and sender.
"""

from __future__ import annotations

import hashlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pydicom
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from .config import NodeConfig
from .logs import configure, log_event
from .pynetdicom_tuning import conn_open_handlers
from .queue import InstanceRecord, Queue
from .scheduler import Scheduler, image_component
from .scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, StoreHandler, completeness_evidence
from .sender import Sender
from .spool import Spool, validate_uid
from .worker import Worker, stop_orphan_app


def reconcile(spool: Spool, queue: Queue, clock: Callable[[], float] = time.time) -> int:
    """Register instance files that are in the spool but not in the queue. Returns the count."""
    known = queue.instance_paths()
    added = 0
    for path in sorted(spool.instances.glob("*/*/*.dcm")):
        rel = str(path.relative_to(spool.root))
        if rel in known:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study = validate_uid(ds.StudyInstanceUID)
            series = validate_uid(ds.SeriesInstanceUID)
            sop = validate_uid(ds.SOPInstanceUID)
        except Exception as exc:  # unreadable or hostile: leave it, say so
            log_event("reconcile_skipped", level="warning", path=rel, reason=str(exc)[:200])
            continue
        if queue.find_instance(sop) is not None:
            continue
        data = path.read_bytes()
        image_type = "\\".join(str(v) for v in ds.get("ImageType", []) or [])
        component, geometry = completeness_evidence(ds, image_component(image_type))
        queue.record_instance(InstanceRecord(
            sop_instance_uid=sop, study_uid=study, series_uid=series,
            sop_class_uid=str(ds.get("SOPClassUID", "")),
            transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")), path=rel,
            sha256=hashlib.sha256(data).hexdigest(), size=len(data), calling_aet="(recovered)",
            modality=str(ds.get("Modality", "")), image_type=image_type,
            series_description=str(ds.get("SeriesDescription", "")),
            component=component, geometry=geometry), clock())
        added += 1
        log_event("instance_recovered", study_uid=study, sop_instance_uid=sop, path=rel)
    return added


class Node:
    """A running DICOM node. ``start()`` returns once it listens; ``stop()`` shuts it down."""

    def __init__(self, cfg: NodeConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.clock = clock
        self.server: Any = None
        self.queue: Queue | None = None

    def start(self) -> None:
        cfg = self.cfg
        self.spool = Spool(cfg.spool, int(cfg.min_free_mb * 1024 * 1024),
                           journal=cfg.ingest_journal)
        removed = self.spool.partial_writes_removed + self.spool.clean_tmp()
        self.queue = Queue(self.spool.db_path)
        recovered = self.queue.recover(cfg.app.max_attempts, self.clock())
        orphans = [job for job, _, pid, attempt in recovered
                   if stop_orphan_app(pid, self.spool.job_dir(job) / f"attempt-{attempt}")]
        added = reconcile(self.spool, self.queue, self.clock)
        log_event("node_recovered", partial_writes_removed=removed, instances_registered=added,
                  journal_files_rewritten=self.spool.replayed,
                  jobs_requeued=[j for j, s, *_ in recovered if s == "queued"],
                  jobs_failed=[j for j, s, *_ in recovered if s == "failed"],
                  orphan_apps_killed=orphans)

        self.handler = StoreHandler(self.spool, self.queue, self.clock)
        self.scheduler = Scheduler(self.queue, cfg.triggers, cfg.study_quiet_seconds, self.clock,
                                   cfg.poll_seconds, cfg.early_start, cfg.early_start_guard_seconds)
        self.sender = Sender(cfg, self.spool, self.queue, self.clock)
        self.workers = [Worker(f"worker-{i + 1}", cfg, self.spool, self.queue, self.scheduler.wake,
                               self.sender.wake.set, self.clock) for i in range(cfg.workers)]

        ae = AE(ae_title=cfg.ae_title)
        a = cfg.association
        ae.maximum_associations = a.maximum_associations
        ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = (a.acse_timeout, a.dimse_timeout,
                                                                 a.network_timeout)
        ae.maximum_pdu_size = a.maximum_pdu_size
        if cfg.allowed_calling_aets:
            ae.require_calling_aet = list(cfg.allowed_calling_aets)
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_C_STORE, self.handler.handle_store),
            (evt.EVT_C_ECHO, self.handler.handle_echo),
            (evt.EVT_ACCEPTED, _log_assoc("association_accepted")),
            (evt.EVT_REJECTED, _log_assoc("association_rejected", "warning")),
            (evt.EVT_ABORTED, _log_assoc("association_aborted", "warning")),
            *conn_open_handlers(a.fast_polling),
        ]
        ssl_context = cfg.tls.server_context() if cfg.tls is not None else None
        self.server = ae.start_server((cfg.bind, cfg.port), block=False, evt_handlers=handlers,
                                      ssl_context=ssl_context)
        self.ae = ae
        self.scheduler.start()
        for w in self.workers:
            w.start()
        self.sender.start()
        log_event("node_started", ae_title=cfg.ae_title, bind=cfg.bind,
                  port=self.server.server_address[1], spool=str(cfg.spool), workers=cfg.workers,
                  destinations=[d.name for d in cfg.destinations], tls=cfg.tls is not None)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        journal = self.spool.journal
        self.spool.close()
        self.scheduler.stop()
        for w in self.workers:
            w.stop()
        self.sender.stop()
        if self.queue is not None:
            self.queue.close()
        # the group commit's effect: instances received per journal fdatasync since the start
        stats = {} if journal is None else {"journal_records": journal.records_written,
                                            "journal_syncs": journal.syncs}
        log_event("node_stopped", ae_title=self.cfg.ae_title, **stats)

    def serve_forever(self) -> None:
        """Start, then run until SIGTERM or SIGINT."""
        configure(self.cfg.log_file)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        stop.wait()
        self.stop()


def _log_assoc(name: str, level: str = "info") -> Callable[[Any], None]:
    def handler(event: Any) -> None:
        req = event.assoc.requestor
        log_event(name, level=level, calling_aet=req.ae_title, peer=f"{req.address}:{req.port}")
    return handler
