"""The C-STORE handler on fake pynetdicom events: status codes, no path escape, duplicates,
out of space; and the start-up reconciliation of files the queue does not know."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from deploy.node.queue import Queue
from deploy.node.scp import (STATUS_CANNOT_DECODE, STATUS_INVALID_UID, STATUS_OUT_OF_RESOURCES,
                             STATUS_SUCCESS, STATUS_UID_MISMATCH, StoreHandler)
from deploy.node.service import reconcile
from deploy.node.spool import Spool


def mr(study: str = "1.2.3", series: str = "1.2.3.4", sop: str | None = None,
       image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "P", "ND")) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop or generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.SeriesDescription, ds.ImageType = "MR", "gre", list(image_type)
    ds.PatientName = "Test"
    return ds


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode_dataset_only(ds: Dataset) -> bytes:
    """The data set as a peer sends it in C-STORE (no preamble, no file meta)."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


class FakeEvent:
    """The parts of pynetdicom's Event the handler uses."""

    def __init__(self, ds: Dataset | None, request_sop: str, raw: bytes = b"", decode_error: bool = False):
        self._ds, self._err = ds, decode_error
        self._raw = raw or (encode_dataset_only(ds) if ds is not None else b"")
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="SCANNER"))
        self.request = SimpleNamespace(AffectedSOPInstanceUID=request_sop, AffectedSOPClassUID=MRImageStorage)
        self.context = SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian)

    @property
    def dataset(self) -> Dataset:
        if self._err:
            raise ValueError("Expected explicit VR, but found implicit VR")
        return self._ds

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        assert not include_meta, "the node builds the file meta itself"
        return self._raw


@pytest.fixture(params=[False, True], ids=["fsync_per_instance", "journal"])
def handler(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[StoreHandler]:
    """The handler on a spool without and with the group-commit journal (ingest_journal)."""
    sp = Spool(tmp_path / "spool", journal=request.param)
    yield StoreHandler(sp, Queue(sp.db_path), clock=lambda: 1000.0)
    sp.close()


def test_store_writes_readable_file_and_records_it(handler: StoreHandler) -> None:
    ds = mr()
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    path = handler.spool.instances / "1.2.3" / "1.2.3.4" / f"{ds.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID
    row = handler.queue.find_instance(ds.SOPInstanceUID)
    assert (row["component"], row["image_type"], row["calling_aet"]) == (
        "phase", "ORIGINAL\\PRIMARY\\P\\ND", "SCANNER")
    assert row["path"] == str(path.relative_to(handler.spool.root))


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
@pytest.mark.parametrize("field, value", [
    ("StudyInstanceUID", "../../x"), ("SeriesInstanceUID", "../../../../tmp/evil"),
    ("StudyInstanceUID", "/etc"), ("SeriesInstanceUID", "1" * 65), ("StudyInstanceUID", ""),
    ("SOPInstanceUID", "1.2/../3"),
])
def test_hostile_uid_is_refused_and_nothing_written(handler: StoreHandler, tmp_path: Path,
                                                    field: str, value: str) -> None:
    ds = mr()
    setattr(ds, field, value)
    status = handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID))
    assert status == STATUS_INVALID_UID
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".dcm"] == []
    assert handler.queue.snapshot()["studies"] == []


def test_missing_uid_and_request_mismatch(handler: StoreHandler) -> None:
    ds = mr()
    del ds.StudyInstanceUID
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_INVALID_UID
    ds = mr()
    assert handler.handle_store(FakeEvent(ds, "1.2.999")) == STATUS_UID_MISMATCH


@pytest.mark.parametrize("junk", [b"junk", b"\x00" * 3])
def test_undecodable_dataset_answers_c210(handler: StoreHandler, junk: bytes) -> None:
    assert handler.handle_store(FakeEvent(None, "1.2", raw=junk, decode_error=True)) == STATUS_CANNOT_DECODE
    assert list(handler.spool.instances.rglob("*.dcm")) == []


def test_file_meta_matches_pydicom_and_data_set_is_byte_exact(handler: StoreHandler) -> None:
    ds = mr()
    ds.PixelData = bytes(range(256)) * 8
    ds.Rows, ds.Columns, ds.BitsAllocated = 32, 32, 16
    raw = encode_dataset_only(ds)
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID, raw=raw)) == STATUS_SUCCESS
    path = handler.spool.instances / "1.2.3" / "1.2.3.4" / f"{ds.SOPInstanceUID}.dcm"
    data = path.read_bytes()
    assert data[128:132] == b"DICM" and data.endswith(raw)
    back = pydicom.dcmread(path)
    meta = back.file_meta
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == MRImageStorage
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.FileMetaInformationVersion == b"\x00\x01"
    assert meta.FileMetaInformationGroupLength == len(data) - len(raw) - 132 - 12
    assert back.PixelData == ds.PixelData


def test_decode_reads_the_identifying_tags_and_refuses_a_broken_sequence() -> None:
    from deploy.node.scp import decode
    ds = mr()
    raw = encode_dataset_only(ds)
    h = decode(raw, ExplicitVRLittleEndian)
    assert (h.StudyInstanceUID, h.SeriesInstanceUID, h.Modality) == ("1.2.3", "1.2.3.4", "MR")
    assert list(h.ImageType) == ["ORIGINAL", "PRIMARY", "P", "ND"]
    # a private sequence whose item is not an item, after a valid header
    garbage_sq = b"\xe1\x7f\x10\x00SQ\x00\x00\xff\xff\xff\xff" + b"\x01\x02\x03\x04\x10\x00\x00\x00" + bytes(4)
    with pytest.raises(Exception):
        decode(raw + garbage_sq, ExplicitVRLittleEndian)


def test_instance_row_is_committed_without_fsync_and_pragma_restored(handler: StoreHandler,
                                                                     monkeypatch) -> None:
    seen = []
    real = handler.queue.record_instance
    monkeypatch.setattr(handler.queue, "record_instance",
                        lambda rec, now, durable=True: (seen.append(durable), real(rec, now, durable))[1])
    ds = mr(series="1.2.3.4")
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    ds.SeriesInstanceUID = "1.2.3.5"  # moved: the old file is deleted, so this commit is durable
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    assert seen == [False, True]
    # the connection is back to synchronous=FULL (2) for every other transaction
    assert handler.queue._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_power_cut_rolling_back_instance_rows_is_repaired_by_reconcile(handler: StoreHandler) -> None:
    stored = [mr() for _ in range(3)]
    for ds in stored:
        assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    # what a power cut can do to the non-durable commits: the newest rows are gone
    with handler.queue._tx() as db:
        for ds in stored[1:]:
            db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (ds.SOPInstanceUID,))
        db.execute("UPDATE studies SET n_instances = 1")
    assert reconcile(handler.spool, handler.queue, clock=lambda: 2000.0) == 2
    assert all(handler.queue.find_instance(ds.SOPInstanceUID) is not None for ds in stored)
    assert handler.queue.snapshot()["studies"][0]["n_instances"] == 3


def test_unexpected_exception_answers_c211_not_crash(handler: StoreHandler, monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("database is locked")
    monkeypatch.setattr(handler.queue, "record_instance", boom)
    ds = mr()
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == 0xC211


def test_duplicate_is_success_and_stored_once(handler: StoreHandler, monkeypatch) -> None:
    ds = mr()
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    writes = []
    real = handler.spool.durable_write
    monkeypatch.setattr(handler.spool, "durable_write", lambda p, d: (writes.append(p), real(p, d)))
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    assert writes == []
    assert handler.queue.snapshot()["studies"][0]["n_instances"] == 1
    # same UID, different content: stored again (replaces)
    ds.PatientName = "Changed"
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    assert len(writes) == 1 and handler.queue.snapshot()["studies"][0]["n_instances"] == 1


def test_same_uid_moved_to_another_series_leaves_one_file(handler: StoreHandler) -> None:
    ds = mr(series="1.2.3.4")
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    ds.SeriesInstanceUID = "1.2.3.5"
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS
    files = list(handler.spool.instances.rglob("*.dcm"))
    assert [f.parent.name for f in files] == ["1.2.3.5"]
    assert handler.queue.find_instance(ds.SOPInstanceUID)["series_uid"] == "1.2.3.5"


def test_out_of_space_answers_a700(handler: StoreHandler) -> None:
    handler.spool.min_free_bytes = 10**18
    ds = mr()
    assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_OUT_OF_RESOURCES
    assert list(handler.spool.instances.rglob("*.dcm")) == []


def test_reconcile_registers_spool_files_missing_from_the_queue(handler: StoreHandler) -> None:
    # the node died after fsync+rename but before the queue commit
    ds = mr(image_type=("ORIGINAL", "PRIMARY", "M", "ND"))
    path = handler.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    handler.spool.durable_write(path, encode(ds))
    known = mr()
    handler.handle_store(FakeEvent(known, known.SOPInstanceUID))
    assert reconcile(handler.spool, handler.queue, clock=lambda: 2000.0) == 1
    row = handler.queue.find_instance(ds.SOPInstanceUID)
    assert (row["component"], row["calling_aet"]) == ("magnitude", "(recovered)")
    assert handler.queue.snapshot()["studies"][0]["n_instances"] == 2
    assert reconcile(handler.spool, handler.queue) == 0  # idempotent
