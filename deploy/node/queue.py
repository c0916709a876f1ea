"""The durable queue: instances, studies, jobs and deliveries in one SQLite file.

SQLite runs in WAL mode with ``synchronous=FULL``: a transaction that returned from COMMIT is on
disk. Every state change is one short transaction. The one exception is the row of a received
instance: its fsynced spool file is the durable record, so the row is committed with
``synchronous=NORMAL`` (atomic, survives kill -9 of the node, but a power cut may roll back the
latest such rows); ``deploy.node.service.reconcile`` re-registers those files at start-up. The
reasoning is in deploy/README.md.

Schema (``PRAGMA user_version`` = 2; a version-1 database is migrated in place on open by adding
the version-2 columns with ALTER TABLE, so an existing spool keeps working)::

    studies(study_uid PK, calling_aet, first_received, last_received, n_instances,
            state: receiving | complete | ignored, reason)
    instances(seq PK autoincrement, sop_instance_uid UNIQUE, study_uid, series_uid, sop_class_uid,
              transfer_syntax, path (relative to the spool), sha256, size, calling_aet, received_at,
              modality, image_type, series_description, component,
              v2: position, orientation, slice_thickness_mm, echo_time_ms, echo_number, echo_train_length,
              images_in_acquisition, instance_number, frames -- see deploy/node/completeness.py)
    jobs(id PK, study_uid, state, trigger, attempts, reason, created_at, updated_at, started_at,
         finished_at, max_seq, n_instances, n_results, app_pid,
         v2: start_reason -- why the job was queued: 'complete: ...' or 'quiet period elapsed')
    deliveries(id PK, job_id -> jobs, result_path, sop_instance_uid, sop_class_uid, transfer_syntax,
               destination, state: pending | delivered | failed, attempts, next_attempt_at,
               last_error, delivered_at, UNIQUE(job_id, result_path, destination))

Job states::

    received  the study is still arriving (quiet period not over)
    queued    quiet period over (or, with early_start, every GRE series complete) and a trigger
              rule matched; waiting for a worker
    running   a worker runs the app on a snapshot (instances with seq <= max_seq)
    done      the app succeeded; deliveries pending
    delivered every result reached every destination
    failed    the app failed (after app.max_attempts tries), or a delivery gave up
    skipped   quiet period over but no trigger rule matched the study

Policy for instances that arrive late (one open job per study): a new instance of a study whose
job is ``received`` or ``queued`` puts that job back to ``received`` (the quiet period restarts and
the snapshot, taken when the job starts, will include it). If the study's job is already
``running`` or finished, a new ``received`` job is created; it runs the app again on the *whole*
study (all instances so far), because the app needs complete series. A duplicate (same SOP
Instance UID, same bytes) changes nothing; a same-UID instance with different bytes replaces the
stored one and counts as new.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .completeness import COLUMNS as COMPLETENESS_COLUMNS

SCHEMA_VERSION = 2

#: Columns added in version 2, per table (added to a version-1 database when it is opened).
V2_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "instances": COMPLETENESS_COLUMNS,
    "jobs": (("start_reason", "TEXT"),),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid       TEXT PRIMARY KEY,
    calling_aet     TEXT,
    first_received  REAL NOT NULL,
    last_received   REAL NOT NULL,
    n_instances     INTEGER NOT NULL DEFAULT 0,
    state           TEXT NOT NULL CHECK (state IN ('receiving', 'complete', 'ignored')),
    reason          TEXT
);
CREATE TABLE IF NOT EXISTS instances (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    sop_instance_uid    TEXT NOT NULL UNIQUE,
    study_uid           TEXT NOT NULL REFERENCES studies(study_uid),
    series_uid          TEXT NOT NULL,
    sop_class_uid       TEXT,
    transfer_syntax     TEXT,
    path                TEXT NOT NULL,
    sha256              TEXT NOT NULL,
    size                INTEGER NOT NULL,
    calling_aet         TEXT,
    received_at         REAL NOT NULL,
    modality            TEXT,
    image_type          TEXT,
    series_description  TEXT,
    component           TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, seq);
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid    TEXT NOT NULL REFERENCES studies(study_uid),
    state        TEXT NOT NULL CHECK (state IN
                 ('received', 'queued', 'running', 'done', 'delivered', 'failed', 'skipped')),
    trigger      TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    reason       TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,
    max_seq      INTEGER,
    n_instances  INTEGER,
    n_results    INTEGER,
    app_pid      INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs(study_uid, state);
CREATE TABLE IF NOT EXISTS deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id           INTEGER NOT NULL REFERENCES jobs(id),
    result_path      TEXT NOT NULL,
    sop_instance_uid TEXT,
    sop_class_uid    TEXT,
    transfer_syntax  TEXT,
    destination      TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL NOT NULL,
    last_error       TEXT,
    delivered_at     REAL,
    UNIQUE (job_id, result_path, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
"""


_GEOMETRY_NAMES = ", ".join(name for name, _ in COMPLETENESS_COLUMNS)


@dataclass(frozen=True)
class InstanceRecord:
    """What the queue keeps about one stored instance."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    sha256: str
    size: int
    calling_aet: str
    modality: str = ""
    image_type: str = ""
    series_description: str = ""
    component: str = ""
    #: what the instance says about its series' completeness (completeness.completeness_fields)
    geometry: dict[str, Any] | None = None


@dataclass(frozen=True)
class SeriesInfo:
    """Distinct trigger-relevant attributes of a study's instances (one row per combination)."""

    series_uid: str
    image_type: str
    series_description: str
    component: str


@dataclass(frozen=True)
class ResultFile:
    """A DICOM file the app wrote, ready to be delivered."""

    path: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str


class Queue:
    """Thread-safe access to the queue database (one connection, one lock, short transactions)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        else:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                       timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, 1, SCHEMA_VERSION):
                raise RuntimeError(f"queue database {self.path} has schema version {version}, "
                                   f"this node understands {SCHEMA_VERSION}")
            if version == 0:  # a new database (the status command never writes to a live one)
                self._db.executescript(SCHEMA)
            if version != SCHEMA_VERSION:
                self._migrate()
        self._db.row_factory = sqlite3.Row

    def _migrate(self) -> None:
        """Add the version-2 columns that are missing (all nullable, so old rows stay valid),
        then set the version, in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in V2_COLUMNS.items():
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                for name, sql_type in columns:
                    if name not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql_type}")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. ``durable=False`` commits without fsyncing the WAL
        (synchronous=NORMAL for this commit only): the commit is atomic and survives a crash of
        the node, but a power cut may roll back it and the other non-durable commits after the
        last durable one. Any later durable commit makes them durable too (the WAL is synced
        as a whole, in order)."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    # ---------------------------------------------------------------- instances and studies

    def find_instance(self, sop_instance_uid: str) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute("SELECT * FROM instances WHERE sop_instance_uid = ?",
                                    (sop_instance_uid,)).fetchone()

    def record_instance(self, rec: InstanceRecord, now: float, durable: bool = True) -> str:
        """Record a stored instance; returns 'new', 'replaced' or 'duplicate'.

        Applies the late-arrival policy of the module docstring in the same transaction.
        ``durable=False`` is for an instance whose fsynced spool file is the durable record:
        after a power cut, ``reconcile`` re-registers a file whose row was rolled back.
        """
        with self._tx(durable) as db:
            old = db.execute("SELECT sha256, study_uid FROM instances WHERE sop_instance_uid = ?",
                             (rec.sop_instance_uid,)).fetchone()
            if old is not None and old["sha256"] == rec.sha256:
                return "duplicate"
            outcome = "new"
            if old is not None:
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,))
                db.execute("UPDATE studies SET n_instances = n_instances - 1 WHERE study_uid = ?",
                           (old["study_uid"],))
                outcome = "replaced"
            study = db.execute("SELECT study_uid FROM studies WHERE study_uid = ?",
                               (rec.study_uid,)).fetchone()
            if study is None:
                db.execute("INSERT INTO studies (study_uid, calling_aet, first_received, last_received,"
                           " n_instances, state) VALUES (?, ?, ?, ?, 0, 'receiving')",
                           (rec.study_uid, rec.calling_aet, now, now))
            geometry = rec.geometry or {}
            db.execute(
                "INSERT INTO instances (sop_instance_uid, study_uid, series_uid, sop_class_uid,"
                " transfer_syntax, path, sha256, size, calling_aet, received_at, modality, image_type,"
                " series_description, component, " + _GEOMETRY_NAMES + ") VALUES (?,?,?,?,?,?,?,?,?,?,"
                "?,?,?,?," + ",".join("?" * len(COMPLETENESS_COLUMNS)) + ")",
                (rec.sop_instance_uid, rec.study_uid, rec.series_uid, rec.sop_class_uid,
                 rec.transfer_syntax, rec.path, rec.sha256, rec.size, rec.calling_aet, now,
                 rec.modality, rec.image_type, rec.series_description, rec.component,
                 *(geometry.get(name) for name, _ in COMPLETENESS_COLUMNS)))
            db.execute("UPDATE studies SET last_received = ?, n_instances = n_instances + 1,"
                       " state = 'receiving', reason = NULL, calling_aet = ? WHERE study_uid = ?",
                       (now, rec.calling_aet, rec.study_uid))
            self._open_job(db, rec.study_uid, now)
            return outcome

    @staticmethod
    def _open_job(db: sqlite3.Connection, study_uid: str, now: float) -> None:
        open_job = db.execute("SELECT id, state FROM jobs WHERE study_uid = ? AND state IN"
                              " ('received', 'queued') ORDER BY id DESC LIMIT 1",
                              (study_uid,)).fetchone()
        if open_job is None:
            db.execute("INSERT INTO jobs (study_uid, state, created_at, updated_at)"
                       " VALUES (?, 'received', ?, ?)", (study_uid, now, now))
        elif open_job["state"] == "queued":
            db.execute("UPDATE jobs SET state = 'received', updated_at = ?, reason ="
                       " 'new instances arrived before the job started' WHERE id = ?",
                       (now, open_job["id"]))

    def instance_paths(self) -> set[str]:
        """Spool-relative paths of every recorded instance (used by the startup reconciliation)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM instances")}

    # ---------------------------------------------------------------- scheduler side

    def receiving_jobs(self) -> list[sqlite3.Row]:
        """Jobs in 'received' with their study's last_received time."""
        with self._lock:
            return self._db.execute(
                "SELECT j.id AS job_id, j.study_uid, s.last_received, s.n_instances, s.calling_aet"
                " FROM jobs j"
                " JOIN studies s ON s.study_uid = j.study_uid WHERE j.state = 'received'"
                " ORDER BY j.id").fetchall()

    def study_series(self, study_uid: str) -> list[SeriesInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT series_uid, image_type, series_description, component"
                " FROM instances WHERE study_uid = ?", (study_uid,)).fetchall()
        return [SeriesInfo(r[0], r[1] or "", r[2] or "", r[3] or "") for r in rows]

    def completeness_rows(self, study_uid: str) -> list[sqlite3.Row]:
        """The study's instances with what completeness.series_completeness reads, by series."""
        with self._lock:
            return self._db.execute(
                "SELECT series_uid, component, " + _GEOMETRY_NAMES + " FROM instances"
                " WHERE study_uid = ? ORDER BY series_uid, seq", (study_uid,)).fetchall()

    def study_ran_before(self, study_uid: str, job_id: int) -> bool:
        """Whether an earlier job of the study was started (this job is then a late-arrival re-run)."""
        with self._lock:
            return self._db.execute(
                "SELECT 1 FROM jobs WHERE study_uid = ? AND id < ? AND started_at IS NOT NULL"
                " LIMIT 1", (study_uid, job_id)).fetchone() is not None

    def complete_study(self, job_id: int, study_uid: str, seen_last_received: float,
                       trigger: str | None, now: float, start_reason: str | None = None) -> bool:
        """Close the quiet period: queue the job (trigger matched) or skip it.

        ``start_reason`` is kept on the job (why it was queued now). Does nothing and returns
        False if an instance arrived since ``seen_last_received``.
        """
        with self._tx() as db:
            row = db.execute("SELECT last_received FROM studies WHERE study_uid = ?",
                             (study_uid,)).fetchone()
            if row is None or row[0] != seen_last_received:
                return False
            if trigger is not None:
                n = db.execute("UPDATE jobs SET state = 'queued', trigger = ?, updated_at = ?,"
                               " reason = NULL, start_reason = ? WHERE id = ? AND state = 'received'",
                               (trigger, now, start_reason, job_id)).rowcount
                db.execute("UPDATE studies SET state = 'complete', reason = NULL WHERE study_uid = ?",
                           (study_uid,))
            else:
                reason = "no series in the study matches the trigger rules"
                n = db.execute("UPDATE jobs SET state = 'skipped', updated_at = ?, reason = ?"
                               " WHERE id = ? AND state = 'received'", (now, reason, job_id)).rowcount
                db.execute("UPDATE studies SET state = 'ignored', reason = ? WHERE study_uid = ?",
                           (reason, study_uid))
            return n == 1

    # ---------------------------------------------------------------- worker side

    def claim_job(self, now: float) -> tuple[sqlite3.Row, list[sqlite3.Row]] | None:
        """Take the oldest queued job: running, attempts + 1, snapshot bound max_seq fixed.

        Returns the job row and its instance rows (those with seq <= max_seq), or None.
        """
        with self._tx() as db:
            job = db.execute("SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if job is None:
                return None
            max_seq = db.execute("SELECT MAX(seq) FROM instances WHERE study_uid = ?",
                                 (job["study_uid"],)).fetchone()[0] or 0
            instances = db.execute("SELECT * FROM instances WHERE study_uid = ? AND seq <= ?"
                                   " ORDER BY seq", (job["study_uid"], max_seq)).fetchall()
            db.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ?,"
                       " updated_at = ?, max_seq = ?, n_instances = ?, reason = NULL WHERE id = ?",
                       (now, now, max_seq, len(instances), job["id"]))
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (job["id"],)).fetchone()
            return job, instances

    def finish_job(self, job_id: int, results: list[ResultFile], destinations: list[str],
                   now: float) -> None:
        """The app succeeded: job 'done' and one pending delivery per (result, destination).

        With no destination configured the job is 'done' and stays there (nothing to send).
        """
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'done', finished_at = ?, updated_at = ?,"
                       " n_results = ?, reason = ? WHERE id = ?",
                       (now, now, len(results),
                        "the app wrote no DICOM result" if not results else
                        None if destinations else "no destination configured", job_id))
            for res in results:
                for dest in destinations:
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries (job_id, result_path, sop_instance_uid,"
                        " sop_class_uid, transfer_syntax, destination, state, next_attempt_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                        (job_id, res.path, res.sop_instance_uid, res.sop_class_uid,
                         res.transfer_syntax, dest, now))

    def fail_job(self, job_id: int, reason: str, max_attempts: int, now: float) -> str:
        """The app failed: back to 'queued' if attempts remain, else 'failed'. Returns the new state."""
        with self._tx() as db:
            attempts = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
            state = "queued" if attempts < max_attempts else "failed"
            db.execute("UPDATE jobs SET state = ?, reason = ?, updated_at = ?, finished_at = ?"
                       " WHERE id = ?", (state, reason, now, now if state == "failed" else None,
                                         job_id))
            return state

    def set_app_pid(self, job_id: int, pid: int | None) -> None:
        """Remember the app's process id (a process group leader) so a restart can stop an orphan."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET app_pid = ? WHERE id = ?", (pid, job_id))

    def recover(self, max_attempts: int, now: float) -> list[tuple[int, str, int | None, int]]:
        """After a restart: every 'running' job goes back to 'queued' (or 'failed' when out of tries).

        Returns (job id, new state, app pid of the interrupted run, its attempt number) per job.
        """
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, app_pid FROM jobs WHERE state = 'running'").fetchall()
            out = []
            for r in rows:
                state = "queued" if r["attempts"] < max_attempts else "failed"
                db.execute("UPDATE jobs SET state = ?, updated_at = ?, reason = ?, app_pid = NULL"
                           " WHERE id = ?",
                           (state, now, "node restarted while the app was running", r["id"]))
                out.append((r["id"], state, r["app_pid"], r["attempts"]))
            return out

    # ---------------------------------------------------------------- sender side

    def due_deliveries(self, now: float, limit: int = 100) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(
                "SELECT d.*, j.study_uid, s.calling_aet FROM deliveries d"
                " JOIN jobs j ON j.id = d.job_id JOIN studies s ON s.study_uid = j.study_uid"
                " WHERE d.state = 'pending' AND d.next_attempt_at <= ?"
                " ORDER BY d.next_attempt_at, d.id LIMIT ?", (now, limit)).fetchall()

    def next_delivery_time(self) -> float | None:
        with self._lock:
            return self._db.execute("SELECT MIN(next_attempt_at) FROM deliveries"
                                    " WHERE state = 'pending'").fetchone()[0]

    def delivery_succeeded(self, delivery_id: int, now: float) -> None:
        with self._tx() as db:
            db.execute("UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,"
                       " delivered_at = ?, last_error = NULL WHERE id = ?", (now, delivery_id))
            self._settle_job(db, delivery_id, now)

    def delivery_failed(self, delivery_id: int, error: str, next_attempt_at: float | None,
                        now: float) -> int:
        """Record a failed attempt; ``next_attempt_at`` None means give up. Returns attempts so far."""
        with self._tx() as db:
            if next_attempt_at is None:
                db.execute("UPDATE deliveries SET state = 'failed', attempts = attempts + 1,"
                           " last_error = ? WHERE id = ?", (error, delivery_id))
            else:
                db.execute("UPDATE deliveries SET attempts = attempts + 1, last_error = ?,"
                           " next_attempt_at = ? WHERE id = ?", (error, next_attempt_at, delivery_id))
            self._settle_job(db, delivery_id, now)
            return db.execute("SELECT attempts FROM deliveries WHERE id = ?",
                              (delivery_id,)).fetchone()[0]

    @staticmethod
    def _settle_job(db: sqlite3.Connection, delivery_id: int, now: float) -> None:
        job_id = db.execute("SELECT job_id FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()[0]
        counts = dict(db.execute("SELECT state, COUNT(*) FROM deliveries WHERE job_id = ?"
                                 " GROUP BY state", (job_id,)).fetchall())
        if counts.get("pending", 0):
            return
        if counts.get("failed", 0):
            db.execute("UPDATE jobs SET state = 'failed', updated_at = ?, reason = ? WHERE id = ?"
                       " AND state = 'done'",
                       (now, f"{counts['failed']} deliveries gave up (see status)", job_id))
        else:
            db.execute("UPDATE jobs SET state = 'delivered', updated_at = ? WHERE id = ?"
                       " AND state = 'done'", (now, job_id))

    # ---------------------------------------------------------------- reporting

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Everything the ``status`` command shows, as plain dicts."""
        with self._lock:
            def rows(sql: str) -> list[dict[str, Any]]:
                return [dict(r) for r in self._db.execute(sql).fetchall()]
            return {
                "studies": rows("SELECT * FROM studies ORDER BY first_received"),
                "jobs": rows("SELECT * FROM jobs ORDER BY id"),
                "deliveries": rows("SELECT * FROM deliveries ORDER BY id"),
            }

    def job(self, job_id: int) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
