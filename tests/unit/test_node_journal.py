"""Spool journal: Success only after the group fdatasync, group commit across writers,
checkpoints, and start-up replay after a simulated power cut (files lost or emptied, torn tail)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE

from deploy.node.config import parse_config
from deploy.node.scp import STATUS_SUCCESS
from deploy.node.service import Node
from deploy.node.spool import Journal, OutOfSpace, Spool

from .test_node_scp import mr

STUDY, SERIES = "1.2.3", "1.2.3.4"


def _path(sp: Spool, sop: str, series: str = SERIES) -> Path:
    return sp.instance_path(STUDY, series, sop)


class BlockingSync:
    """os.fdatasync that blocks until released and counts its calls."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self._real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(10), "fdatasync was never released"
        self._real(fd)


def test_write_returns_only_after_the_sync_and_file_appears_after_it(tmp_path: Path,
                                                                      monkeypatch) -> None:
    sp = Spool(tmp_path / "spool", journal=True)
    block = BlockingSync()
    monkeypatch.setattr(os, "fdatasync", block)
    target = _path(sp, "1.2.3.4.5")
    done = threading.Event()
    t = threading.Thread(target=lambda: (sp.durable_write(target, b"x" * 1000), done.set()))
    t.start()
    assert block.entered.wait(5)
    time.sleep(0.2)
    assert not done.is_set(), "durable_write returned before its record was synced"
    assert not target.exists(), "the file became visible before its record was durable"
    block.release.set()
    t.join(5)
    assert done.is_set() and target.read_bytes() == b"x" * 1000
    sp.close()


def test_concurrent_writers_share_one_sync(tmp_path: Path, monkeypatch) -> None:
    sp = Spool(tmp_path / "spool", journal=True)
    block = BlockingSync()
    monkeypatch.setattr(os, "fdatasync", block)
    sops = [f"1.2.3.4.{k}" for k in range(8)]
    threads = [threading.Thread(target=sp.durable_write, args=(_path(sp, s), s.encode() * 100))
               for s in sops]
    threads[0].start()
    assert block.entered.wait(5)
    for t in threads[1:]:
        t.start()
    time.sleep(0.3)  # the other seven wrote their records and wait behind the first sync
    block.release.set()
    for t in threads:
        t.join(5)
    assert [(_path(sp, s)).read_bytes() for s in sops] == [s.encode() * 100 for s in sops]
    assert sp.journal is not None and sp.journal.syncs == 2 and block.calls == 2
    sp.close()


def test_full_segments_are_checkpointed_and_deleted(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool", journal=True, segment_bytes=20_000)
    for k in range(20):
        sp.durable_write(_path(sp, f"1.2.3.4.{k}"), bytes([k]) * 5000)
    assert sp.journal is not None
    deadline = time.monotonic() + 10
    while sp.journal.checkpoints < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sp.journal.checkpoints >= 5  # 20 records of ~5 kB in 20 kB segments: 5 full ones
    assert len(list((sp.root / "journal").glob("seg-*.log"))) <= 2
    sp.close()
    assert list((sp.root / "journal").glob("seg-*.log")) == []
    assert all(_path(sp, f"1.2.3.4.{k}").read_bytes() == bytes([k]) * 5000 for k in range(20))


def _power_cut(sp: Spool) -> None:
    """What a power cut before the checkpoint may leave: the journal thread stops, the segment
    stays; renamed but unsynced files are gone or empty."""
    assert sp.journal is not None
    with sp.journal._cond:
        sp.journal._closed = True
        sp.journal._full.append(None)
        sp.journal._cond.notify_all()
    sp.journal._checkpointer.join(5)


def test_replay_restores_lost_and_emptied_files_and_ignores_a_torn_tail(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    sp = Spool(root, journal=True)
    data = {f"1.2.3.4.{k}": os.urandom(3000 + k) for k in range(6)}
    for sop, d in data.items():
        sp.durable_write(_path(sp, sop), d)
    _power_cut(sp)
    (seg,) = (root / "journal").glob("seg-*.log")
    assert [r[0] for r in Journal.records(seg)] == [
        str(_path(sp, s).relative_to(root)) for s in data]
    _path(sp, "1.2.3.4.0").unlink()
    _path(sp, "1.2.3.4.1").write_bytes(b"")
    _path(sp, "1.2.3.4.2").write_bytes(data["1.2.3.4.2"][:100])
    # a record being written when the power went: its header and part of its data
    with open(seg, "r+b") as f:
        end = sum(20 + len(r[0]) + r[2] for r in Journal.records(seg))
        f.seek(end)
        whole = open(seg, "rb").read()[:end]
        f.write(whole[:20 + 40 + 500])  # a copy of the first record, cut short
    sp2 = Spool(root, journal=True)
    assert sp2.replayed == 3
    assert {s: _path(sp2, s).read_bytes() for s in data} == data
    assert [p.name for p in (root / "journal").glob("seg-*.log")] != [seg.name]
    sp2.close()


def test_replay_keeps_only_the_latest_copy_of_a_moved_instance(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    sp = Spool(root, journal=True)
    old, new = _path(sp, "1.2.3.4.9", "1.2.3.5"), _path(sp, "1.2.3.4.9", "1.2.3.6")
    sp.durable_write(old, b"old" * 100)
    sp.durable_write(new, b"new" * 100)
    old.unlink()  # what the C-STORE handler does for an instance that moved series
    _power_cut(sp)
    new.unlink()
    sp2 = Spool(root, journal=True)
    assert sp2.replayed == 1 and not old.exists() and new.read_bytes() == b"new" * 100
    sp2.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_c_store_response_waits_for_the_journal_sync(tmp_path: Path, monkeypatch) -> None:
    port = _free_port()
    cfg = parse_config({"ae_title": "CMB_NODE", "port": port, "bind": "127.0.0.1",
                        "spool": str(tmp_path / "spool"), "study_quiet_seconds": 3600,
                        "min_free_mb": 1, "poll_seconds": 0.5, "ingest_journal": True})
    assert cfg.ingest_journal is True
    node = Node(cfg)
    node.start()
    block = BlockingSync()
    try:
        ae = AE(ae_title="SCANNER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="CMB_NODE")
        assert assoc.is_established
        ds = mr(sop=generate_uid())
        monkeypatch.setattr(os, "fdatasync", block)
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(int(assoc.send_c_store(ds).Status)))
        t.start()
        assert block.entered.wait(5)
        time.sleep(0.3)
        assert result == [], "Success came back before the journal sync ended"
        block.release.set()
        t.join(10)
        assert result == [STATUS_SUCCESS]
        assoc.release()
        stored = node.spool.instance_path(STUDY, SERIES, ds.SOPInstanceUID)
        assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    finally:
        block.release.set()
        node.stop()


def test_many_writers_rotating_small_segments_checkpoint_each_segment_once(tmp_path: Path,
                                                                           monkeypatch) -> None:
    """Writers that find the segment full while another one rotates it must not rotate (sync,
    hand to the checkpointer) the old segment a second time."""
    sp = Spool(tmp_path / "spool", journal=True, segment_bytes=3 * 1200)
    assert sp.journal is not None
    seen: list[int] = []
    real = Journal._checkpoint
    monkeypatch.setattr(Journal, "_checkpoint", lambda self, seg: (seen.append(seg.id), real(self, seg)))
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for k in range(25):
                sp.durable_write(_path(sp, f"1.2.3.4.{w}.{k}"), bytes([w, k]) * 500)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sp.close()
    assert errors == []
    assert len(seen) == len(set(seen)) == sp.journal._counter  # every segment exactly once
    assert sp.journal.checkpoints == sp.journal._counter > 8 * 25 // 3 - 1
    assert list((sp.root / "journal").glob("seg-*.log")) == []
    assert all(_path(sp, f"1.2.3.4.{w}.{k}").read_bytes() == bytes([w, k]) * 500
               for w in range(8) for k in range(25))


def test_disk_full_when_rotating_answers_out_of_space_and_keeps_the_segment(tmp_path: Path,
                                                                            monkeypatch) -> None:
    root = tmp_path / "spool"
    sp = Spool(root, journal=True, segment_bytes=2500)
    assert sp.journal is not None
    first = _path(sp, "1.2.3.4.1")
    sp.durable_write(first, b"a" * 2000)
    real = Journal._new_segment

    def full(self, need):
        raise OutOfSpace(28, "spool disk is full: No space left on device")

    monkeypatch.setattr(Journal, "_new_segment", full)
    with pytest.raises(OutOfSpace):
        sp.durable_write(_path(sp, "1.2.3.4.2"), b"b" * 2000)  # does not fit: rotation fails
    assert not _path(sp, "1.2.3.4.2").exists()
    time.sleep(0.3)  # time for the checkpointer to take a segment it was wrongly handed
    assert sp.journal.checkpoints == 0 and sp.journal._full == []  # old segment still current
    monkeypatch.setattr(Journal, "_new_segment", real)
    sp.durable_write(_path(sp, "1.2.3.4.3"), b"c" * 2000)  # space again: rotates, writes
    deadline = time.monotonic() + 10
    while sp.journal.checkpoints < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sp.journal.checkpoints == 1  # the first segment, once, after its file was fsynced
    _power_cut(sp)
    _path(sp, "1.2.3.4.3").unlink()  # lost with the page cache: only the journal has it
    sp2 = Spool(root, journal=True)
    assert sp2.replayed == 1 and first.read_bytes() == b"a" * 2000
    assert _path(sp2, "1.2.3.4.3").read_bytes() == b"c" * 2000
    sp2.close()


def test_a_start_with_the_journal_turned_off_still_replays_what_it_left(tmp_path: Path) -> None:
    """Power cut with ingest_journal on, restart with it off: the leftover segment is replayed
    anyway (the acknowledged files are only there), and no new journal is opened."""
    root = tmp_path / "spool"
    sp = Spool(root, journal=True)
    data = {f"1.2.3.4.{k}": os.urandom(2000 + k) for k in range(4)}
    for sop, d in data.items():
        sp.durable_write(_path(sp, sop), d)
    _power_cut(sp)
    _path(sp, "1.2.3.4.0").unlink()
    _path(sp, "1.2.3.4.3").write_bytes(b"")
    (root / "tmp" / "x.part").write_bytes(b"half")
    sp2 = Spool(root, journal=False)
    assert sp2.journal is None and sp2.replayed == 2 and sp2.partial_writes_removed == 1
    assert {s: _path(sp2, s).read_bytes() for s in data} == data
    assert list((root / "journal").glob("seg-*.log")) == []
    sp2.durable_write(_path(sp2, "1.2.3.4.9"), b"no journal")  # fsync per instance from here
    assert list((root / "journal").glob("seg-*.log")) == []
