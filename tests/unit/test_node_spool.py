"""Spool: UID validation, path building, durable writes (fsync of file and folder), out of space."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from deploy.node import spool as spool_mod
from deploy.node.spool import InvalidUID, OutOfSpace, Spool, validate_uid

GOOD = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"


@pytest.mark.parametrize("uid", [GOOD, "1", "0.0", "1.2.3", "9" * 64, "1.2.3\x00", "1.2.3 "])
def test_valid_uids_pass(uid: str) -> None:
    assert validate_uid(uid) == uid.rstrip("\x00 ")


@pytest.mark.parametrize("uid", [
    "../../x", "..", ".", "1.2/../../etc", "/etc/passwd", "1.2.3/4", "1\\2", "1..2", ".1.2", "1.2.",
    "", " ", "1.2.a", "1.2.3\x00x", "1.2 .3", "9" * 65, "1." * 32 + "1", "１.２", "1.2\n3", None,
])
def test_hostile_or_malformed_uids_are_rejected(uid: object) -> None:
    with pytest.raises(InvalidUID):
        validate_uid(uid)


def test_instance_path_is_built_from_validated_uids_inside_the_spool(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    path = sp.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert path == tmp_path / "spool" / "instances" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    for bad in (("../..", "1", "1"), ("1", "../x", "1"), ("1", "1", "../../../../tmp/evil")):
        with pytest.raises(InvalidUID):
            sp.instance_path(*bad)


def test_durable_write_fsyncs_file_and_folders_before_returning(tmp_path: Path, monkeypatch) -> None:
    sp = Spool(tmp_path / "spool")
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(spool_mod.os, "fsync", spy)
    path = sp.instance_path("1.2", "1.2.3", "1.2.3.4")
    sp.durable_write(path, b"DICM" * 100)
    assert path.read_bytes() == b"DICM" * 100
    # the temp file was fsynced (then renamed), the new folders' parents and the final folder too
    assert any(s.startswith(str(sp.tmp)) and s.endswith(".part") for s in synced)
    for folder in (sp.instances, sp.instances / "1.2", path.parent):
        assert str(folder) in synced, (folder, synced)
    assert synced.index(str(path.parent)) == len(synced) - 1  # folder fsync after the rename
    assert list(sp.tmp.iterdir()) == []


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    path = sp.instance_path("1.2", "1.2.3", "1.2.3.4")
    sp.durable_write(path, b"first")
    sp.durable_write(path, b"second")
    assert path.read_bytes() == b"second"
    assert list(sp.tmp.iterdir()) == []


def test_free_space_threshold_refuses_before_writing(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", min_free_bytes=10**18)
    path = sp.instance_path("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(OutOfSpace):
        sp.durable_write(path, b"x")
    assert not path.exists() and list(sp.tmp.iterdir()) == []


def test_disk_full_during_write_is_out_of_space_and_leaves_no_partial_file(tmp_path: Path,
                                                                          monkeypatch) -> None:
    sp = Spool(tmp_path / "spool")

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod.os, "write", full)
    path = sp.instance_path("1.2", "1.2.3", "1.2.3.4")
    with pytest.raises(OutOfSpace):
        sp.durable_write(path, b"x" * 10)
    assert not path.exists() and list(sp.tmp.iterdir()) == []


def test_clean_tmp_removes_partial_writes(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    (sp.tmp / "a.part").write_bytes(b"half")
    (sp.tmp / "b.part").write_bytes(b"half")
    assert sp.clean_tmp() == 2 and list(sp.tmp.iterdir()) == []


def test_snapshot_links_files_and_starts_clean(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    src = sp.instance_path("1.2", "1.2.3", "1.2.3.4")
    sp.durable_write(src, b"pixels")
    dest = sp.job_dir(7) / "input"
    dest.mkdir(parents=True)
    (dest / "stale.dcm").write_bytes(b"old run")
    sp.snapshot([(src, "1.2.3/1.2.3.4.dcm")], dest)
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["1.2.3.4.dcm"]
    linked = dest / "1.2.3" / "1.2.3.4.dcm"
    assert linked.read_bytes() == b"pixels" and linked.stat().st_ino == src.stat().st_ino


def test_dir_syncer_covers_every_caller_and_shares_fsyncs(tmp_path, monkeypatch) -> None:
    """Concurrent callers each return only after an fsync that started after their call."""
    import threading
    import time as _time

    from deploy.node import spool as spool_mod

    started: list[int] = []   # index of the fsync each caller's call came before
    calls: list[tuple[int, int]] = []  # (fsync sequence number at call time, at return)
    lock = threading.Lock()

    def slow_fsync(folder):
        with lock:
            started.append(len(started))
        _time.sleep(0.02)

    monkeypatch.setattr(spool_mod, "fsync_dir", slow_fsync)
    syncer = spool_mod.DirSyncer()
    folder = tmp_path

    barrier = threading.Barrier(16)

    def caller():
        barrier.wait()  # all callers arrive together, as concurrent associations would
        with lock:
            before = len(started)  # fsyncs already started when this rename was done
        syncer.sync(folder)
        with lock:
            calls.append((before, len(started)))

    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 16
    # each caller saw at least one fsync start after its call
    assert all(after > before for before, after in calls)
    # and 16 callers shared far fewer than 16 fsyncs
    assert syncer.fsyncs == len(started) < 16
    # a lone caller still gets its own fsync
    n = syncer.fsyncs
    syncer.sync(folder)
    assert syncer.fsyncs == n + 1
