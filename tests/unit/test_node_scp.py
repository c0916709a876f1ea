"""The C-STORE handler on fake pynetdicom events: status codes, no path escape, duplicates,
out of space; and the start-up reconciliation of files the queue does not know."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
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


class FakeEvent:
    """The parts of pynetdicom's Event the handler uses."""

    def __init__(self, ds: Dataset | None, request_sop: str, raw: bytes = b"", decode_error: bool = False):
        self._ds, self._raw, self._err = ds, raw or (encode(ds) if ds is not None else b""), decode_error
        self.assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="SCANNER"))
        self.request = SimpleNamespace(AffectedSOPInstanceUID=request_sop, AffectedSOPClassUID=MRImageStorage)
        self.context = SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian)

    @property
    def dataset(self) -> Dataset:
        if self._err:
            raise ValueError("Expected explicit VR, but found implicit VR")
        return self._ds

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        return self._raw


@pytest.fixture
def handler(tmp_path: Path) -> StoreHandler:
    sp = Spool(tmp_path / "spool")
    return StoreHandler(sp, Queue(sp.db_path), clock=lambda: 1000.0)


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


def test_undecodable_dataset_answers_c210(handler: StoreHandler) -> None:
    assert handler.handle_store(FakeEvent(None, "1.2", raw=b"junk", decode_error=True)) == STATUS_CANNOT_DECODE


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
