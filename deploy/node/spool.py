"""The spool: where received instances and job files live on disk, written durably.

Layout under the spool folder::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances
    jobs/<job id>/input/...      snapshot of a study for one app run (hard links into instances/)
    jobs/<job id>/output/...     what the app wrote; DICOM files there are delivered
    tmp/                         partial writes (same file system, so rename is atomic)
    queue.sqlite                 the durable queue (see deploy.node.queue)

Paths are built only from UIDs that pass :func:`validate_uid` (digits and dots, at most 64
characters), never from raw strings a peer sent, so no path can leave the spool.

A file is durable when :func:`durable_write` returns. Two ways, chosen per spool:

* without a journal: the bytes went to a temporary file that was fsynced, then renamed onto the
  final name, and the folder (plus any folder created on the way) was fsynced, so after a power
  cut the file is either there whole or not there at all (two fsyncs per instance);
* with a journal (:class:`Journal`, the node's default, ``ingest_journal``): the path and bytes
  are appended as one checksummed record to a preallocated segment file under ``journal/`` and
  the segment is fdatasynced - one sync per *group* of concurrent writers (group commit); the
  file is preallocated, so the sync never has to record a new file size (ext4 still marks the
  preallocated blocks written as they fill). Only then is the file written to tmp
  and renamed into place (visible whole, not yet fsynced). A background checkpoint fsyncs the
  files of a full segment and their folders and only then deletes the segment. At start-up,
  :meth:`Journal.replay` rewrites (durably, the first way) every file of a remaining segment
  that is missing or differs from its record, so a power cut loses nothing that was
  acknowledged; a torn record at a segment's tail was never acknowledged and is ignored. The
  replay runs at every start, also with the journal turned off since.

The journal is written by hand: it is a plain write-ahead log (length + CRC-32 records, one
fdatasync per group); no library in the project's stack offers a durable append log of files.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import struct
import uuid
import zlib
from pathlib import Path

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
UID_MAX_LEN = 64


class InvalidUID(ValueError):
    """A UID that is not digits-and-dots or is longer than 64 characters."""


class OutOfSpace(OSError):
    """The spool has less free space than the configured threshold, or the disk is full."""


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` as a UID string if it is a valid DICOM UID, else raise :class:`InvalidUID`.

    Valid: only digits and single dots, not starting or ending with a dot, at most 64 characters.
    A trailing NUL or space (DICOM padding) is stripped first.
    """
    if not isinstance(value, str):
        value = str(value) if value is not None else ""
    uid = value.rstrip("\x00 ")
    if not uid or len(uid) > UID_MAX_LEN or not UID_RE.match(uid):
        shown = uid if len(uid) <= 80 else uid[:80] + "..."
        raise InvalidUID(f"{what} is not a valid DICOM UID: {shown!r}")
    return uid


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or a new entry in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSyncer:
    """Group commit for folder fsyncs: concurrent writers into one folder share one fsync.

    A caller that renamed a file into ``folder`` calls :meth:`sync` and returns only once an
    fsync of ``folder`` has *started after* its call (so it covers the rename). While one fsync
    runs, later callers wait for it to end and then one of them runs the next fsync for all of
    them. A single writer still pays one fsync per file; N concurrent associations pay about one
    per round instead of N.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested: dict[Path, int] = {}
        self._synced: dict[Path, int] = {}
        self._busy: set[Path] = set()
        self.fsyncs = 0  # number of fsyncs actually run (for tests and benchmarks)

    def sync(self, folder: Path) -> None:
        with self._cond:
            ticket = self._requested.get(folder, 0) + 1
            self._requested[folder] = ticket
            while self._synced.get(folder, 0) < ticket:
                if folder in self._busy:
                    self._cond.wait()
                    continue
                self._busy.add(folder)
                target = self._requested[folder]  # every rename that asked so far
                self._cond.release()
                try:
                    fsync_dir(folder)  # an error propagates: the caller answers a failure
                finally:
                    self._cond.acquire()
                    self._busy.discard(folder)
                    self._cond.notify_all()
                self.fsyncs += 1
                self._synced[folder] = max(self._synced.get(folder, 0), target)
            if len(self._requested) > 1024:  # forget idle folders (one per series)
                for f in [f for f in self._requested if f not in self._busy
                          and self._synced.get(f, 0) >= self._requested[f]]:
                    self._requested.pop(f, None)
                    self._synced.pop(f, None)


def make_dirs_durable(path: Path, stop: Path) -> None:
    """Create ``path`` (and parents below ``stop``) and fsync every parent whose entries changed."""
    missing = []
    p = path
    while not p.exists() and p != stop and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        fsync_dir(d.parent)


class Spool:
    """Durable file storage for instances and job folders (see module docstring)."""

    def __init__(self, root: Path, min_free_bytes: int = 0, journal: bool = False,
                 segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_bytes)
        self.instances = self.root / "instances"
        self.jobs = self.root / "jobs"
        self.tmp = self.root / "tmp"
        self.dir_syncer = DirSyncer()
        for d in (self.root, self.instances, self.jobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)
        self.journal: Journal | None = None
        #: files rewritten from the journal at start-up (power cut before a checkpoint)
        self.replayed = 0
        #: partial writes removed here at start-up (before the replay), for the recovery log
        self.partial_writes_removed = 0
        # A journal left by an earlier run is replayed even when the journal is now off: after a
        # power cut its segments hold acknowledged instances whose files were never fsynced.
        if journal or (self.root / "journal").is_dir():
            self.partial_writes_removed = self.clean_tmp()
            self.replayed = Journal.replay(self)
        if journal:
            self.journal = Journal(self, segment_bytes)

    def close(self) -> None:
        """Checkpoint and close the journal (no-op without one)."""
        if self.journal is not None:
            self.journal.close()

    @property
    def db_path(self) -> Path:
        return self.root / "queue.sqlite"

    def clean_tmp(self) -> int:
        """Remove partial writes left by a crash (they were never acknowledged). Returns the count."""
        n = 0
        for f in self.tmp.iterdir():
            if f.is_file():
                f.unlink()
                n += 1
        return n

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance; every UID is validated, so the path stays inside the spool."""
        study = validate_uid(study_uid, "StudyInstanceUID")
        series = validate_uid(series_uid, "SeriesInstanceUID")
        sop = validate_uid(sop_uid, "SOPInstanceUID")
        path = self.instances / study / series / f"{sop}.dcm"
        # Belt and braces: validated UIDs have no separator and no "..", but check anyway
        # (lexically: resolving symlinks on every instance costs more than the fsyncs).
        if path.parent.parent.parent != self.instances or ".." in path.parts:
            raise InvalidUID(f"instance path escapes the spool: {path}")
        return path

    def job_dir(self, job_id: int) -> Path:
        return self.jobs / str(int(job_id))

    def check_free_space(self, needed: int = 0) -> None:
        """Raise :class:`OutOfSpace` if writing ``needed`` bytes would leave less than the threshold."""
        free = shutil.disk_usage(self.root).free
        if free - needed < self.min_free_bytes:
            raise OutOfSpace(errno.ENOSPC,
                             f"spool free space {free // (1024 * 1024)} MiB is below the configured "
                             f"minimum {self.min_free_bytes // (1024 * 1024)} MiB")

    def durable_write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably (temp file, fsync, rename, fsync dirs).

        Raises :class:`OutOfSpace` on a full disk (ENOSPC / EDQUOT); the temp file is removed.
        """
        self.check_free_space(len(data))
        make_dirs_durable(path.parent, self.root)
        if self.journal is not None:
            try:
                seg = self.journal.append(path, data)  # durable from here on (replayable)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OutOfSpace(exc.errno, f"spool disk is full: {exc.strerror}") from exc
                raise
            written = None
            try:
                self._write_replace(path, data, sync=False)
                written = path
            finally:
                self.journal.materialised(seg, written)
            return
        self._write_replace(path, data, sync=True)
        self.dir_syncer.sync(path.parent)

    def _write_replace(self, path: Path, data: bytes, sync: bool) -> None:
        """Write ``data`` to a temp file (fsynced when ``sync``) and rename it onto ``path``."""
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(exc.errno, f"spool disk is full: {exc.strerror}") from exc
            raise

    def snapshot(self, sources: list[tuple[Path, str]], dest: Path) -> None:
        """Make ``dest`` hold the given files (hard links, or copies across file systems).

        ``sources`` pairs a spool file with its relative name inside ``dest``. ``dest`` is emptied
        first, so a job re-run after a crash starts from a clean snapshot.
        """
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        for src, rel in sources:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, target)
            except OSError:
                shutil.copyfile(src, target)


def fsync_file(path: Path) -> None:
    """fsync an existing file (used on app outputs before they are queued for delivery)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_REC = struct.Struct("<4sIIII")  # magic, segment id, path length, data length, CRC-32
_MAGIC = b"CMBJ"


def _crc(seg_id: int, rel: bytes, data: bytes) -> int:
    return zlib.crc32(struct.pack("<III", seg_id, len(rel), len(data)),
                      zlib.crc32(data, zlib.crc32(rel)))


class _Segment:
    """One preallocated journal file and the instance files whose records it holds."""

    def __init__(self, path: Path, seg_id: int, size: int) -> None:
        self.path, self.id, self.size = path, seg_id, size
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            os.posix_fallocate(self.fd, 0, size)
            os.fsync(self.fd)
        except OSError:
            os.close(self.fd)
            path.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)
        self.offset = 0
        self.files: list[Path] = []
        self.pending = 0  # records appended whose file is not written yet


class Journal:
    """Write-ahead log of received instances with group commit (see module docstring).

    :meth:`append` returns once the record is on disk: records are written in order under one
    lock, and one ``fdatasync`` covers every record written before it started, so concurrent
    associations share it (``syncs`` counts them). A full segment goes to a checkpoint thread
    that fsyncs its files and folders, then deletes it.
    """

    def __init__(self, spool: Spool, segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.spool = spool
        self.dir = spool.root / "journal"
        if not self.dir.is_dir():
            self.dir.mkdir()
            fsync_dir(spool.root)
        self.segment_bytes = int(segment_bytes)
        self._cond = threading.Condition()
        self._counter = 0
        self._written = 0
        self._synced = 0
        self._syncing = False
        self._closed = False
        self._active = 0  # appends in progress (close waits for them)
        self.syncs = 0
        self.checkpoints = 0
        self._full: list[_Segment | None] = []
        self._seg = self._new_segment(0)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop,
                                              name="spool-checkpoint", daemon=True)
        self._checkpointer.start()

    def _new_segment(self, need: int) -> _Segment:
        self._counter += 1
        seg_id = int.from_bytes(os.urandom(4), "little")
        try:
            return _Segment(self.dir / f"seg-{self._counter:08d}-{seg_id:08x}.log", seg_id,
                            max(self.segment_bytes, need))
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfSpace(exc.errno, f"spool disk is full: {exc.strerror}") from exc
            raise

    def append(self, path: Path, data: bytes) -> _Segment:
        """Append one record (``path`` relative to the spool, ``data``); return once durable."""
        rel = str(path.relative_to(self.spool.root)).encode("utf-8")
        need = _REC.size + len(rel) + len(data)
        with self._cond:
            if self._closed:
                raise OSError(errno.ESHUTDOWN, "the spool journal is closed")
            self._active += 1
            try:
                return self._append_locked(rel, data, need)
            finally:
                self._active -= 1
                self._cond.notify_all()

    def _append_locked(self, rel: bytes, data: bytes, need: int) -> _Segment:
        while True:
            seg = self._seg  # read again after every wait: another writer may have rotated
            if seg.offset + need <= seg.size:
                break
            if self._syncing:  # the leader's fdatasync uses the current segment's fd
                self._cond.wait()
                continue
            # The new segment first: if it cannot be made (disk full) the full one stays current
            # and is not handed to the checkpointer (which closes its fd).
            new = self._new_segment(need)
            os.fdatasync(seg.fd)  # every record written so far is now durable
            self.syncs += 1
            self._synced = self._written
            self._full.append(seg)
            self._seg = new
            self._cond.notify_all()
        header = _REC.pack(_MAGIC, seg.id, len(rel), len(data), _crc(seg.id, rel, data))
        written = os.pwritev(seg.fd, [header, rel, data], seg.offset)
        if written != need:
            raise OSError(errno.EIO, f"short journal write ({written} of {need} bytes)")
        seg.offset += need
        seg.pending += 1
        self._written += 1
        ticket = self._written
        try:
            while self._synced < ticket:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                target, fd = self._written, self._seg.fd
                self._cond.release()
                try:
                    os.fdatasync(fd)
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                self.syncs += 1
                self._synced = max(self._synced, target)
        except BaseException:
            seg.pending -= 1
            raise
        return seg

    @property
    def records_written(self) -> int:
        """Records appended since start (``records_written / syncs``: instances per fdatasync)."""
        return self._written

    def materialised(self, seg: _Segment, path: Path | None) -> None:
        """The file of a record appended to ``seg`` was written (``None``: writing it failed)."""
        with self._cond:
            if path is not None:
                seg.files.append(path)
            seg.pending -= 1
            self._cond.notify_all()

    def _checkpoint_loop(self) -> None:
        while True:
            with self._cond:
                while not self._full:
                    self._cond.wait()
                seg = self._full.pop(0)
                if seg is None:
                    return
                while seg.pending > 0:
                    self._cond.wait()
            try:
                self._checkpoint(seg)
            except OSError:
                pass  # the segment stays; the next start replays it

    def _checkpoint(self, seg: _Segment) -> None:
        os.close(seg.fd)  # no writer left: each append returned only after its record's sync
        folders = set()
        for f in seg.files:
            try:
                fsync_file(f)
            except FileNotFoundError:
                continue  # deleted since (an instance that moved to another series)
            folders.add(f.parent)
        for d in folders:
            fsync_dir(d)
        seg.path.unlink()
        fsync_dir(self.dir)
        self.checkpoints += 1

    def close(self) -> None:
        """Checkpoint the current segment and stop the checkpoint thread."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._syncing or self._active:
                self._cond.wait()
            self._full.extend([self._seg, None])
            self._cond.notify_all()
        self._checkpointer.join()

    @staticmethod
    def records(segment: Path) -> list[tuple[str, int, int]]:
        """(relative path, data offset, data length) of each intact record, up to the first one
        that is not (a torn tail or the preallocated zeros)."""
        out = []
        with open(segment, "rb") as f:
            buf = f.read()
        off = 0
        seg_id = None
        while off + _REC.size <= len(buf):
            magic, sid, plen, dlen, crc = _REC.unpack_from(buf, off)
            if magic != _MAGIC or (seg_id is not None and sid != seg_id):
                break
            start = off + _REC.size
            end = start + plen + dlen
            if end > len(buf):
                break
            rel, data = buf[start:start + plen], buf[start + plen:end]
            if _crc(sid, rel, data) != crc:
                break
            seg_id = sid
            out.append((rel.decode("utf-8", "replace"), start + plen, dlen))
            off = end
        return out

    @staticmethod
    def replay(spool: Spool) -> int:
        """Make every file recorded in a leftover segment durable and equal to its record, then
        delete the segments. The last record of a SOP Instance UID wins (an instance re-sent under
        another series had its older file deleted). Returns the number of files rewritten."""
        jdir = spool.root / "journal"
        if not jdir.is_dir():
            return 0
        segments = sorted(jdir.glob("seg-*.log"))
        latest: dict[str, tuple[Path, str, int, int]] = {}
        for seg in segments:
            for rel, off, n in Journal.records(seg):
                parts = Path(rel).parts
                if len(parts) != 4 or parts[0] != "instances" or not parts[3].endswith(".dcm"):
                    continue
                try:
                    path = spool.instance_path(parts[1], parts[2], parts[3][:-4])
                except InvalidUID:
                    continue
                latest[parts[3]] = (path, str(seg), off, n)
        rewritten = 0
        folders = set()
        for path, seg_name, off, n in latest.values():
            with open(seg_name, "rb") as f:
                f.seek(off)
                data = f.read(n)
            try:
                same = path.stat().st_size == n and path.read_bytes() == data
            except FileNotFoundError:
                same = False
            if same:
                fsync_file(path)
            else:
                make_dirs_durable(path.parent, spool.root)
                spool._write_replace(path, data, sync=True)
                rewritten += 1
            folders.add(path.parent)
        for d in folders:
            fsync_dir(d)
        for seg in segments:
            seg.unlink()
        if segments:
            fsync_dir(jdir)
        return rewritten
