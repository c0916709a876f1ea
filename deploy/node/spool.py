"""The spool: where received instances and job files live on disk, written durably.

Layout under the spool folder::

    instances/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances
    jobs/<job id>/input/...      snapshot of a study for one app run (hard links into instances/)
    jobs/<job id>/output/...     what the app wrote; DICOM files there are delivered
    tmp/                         partial writes (same file system, so rename is atomic)
    queue.sqlite                 the durable queue (see deploy.node.queue)

Paths are built only from UIDs that pass :func:`validate_uid` (digits and dots, at most 64
characters), never from raw strings a peer sent, so no path can leave the spool.

A file is durable when :func:`durable_write` returns: the bytes went to a temporary file that was
fsynced, then renamed onto the final name, and the folder (plus any folder created on the way) was
fsynced, so after a power cut the file is either there whole or not there at all.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import threading
import uuid
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

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = int(min_free_bytes)
        self.instances = self.root / "instances"
        self.jobs = self.root / "jobs"
        self.tmp = self.root / "tmp"
        self.dir_syncer = DirSyncer()
        for d in (self.root, self.instances, self.jobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)

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
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
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
        self.dir_syncer.sync(path.parent)

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
