"""pynetdicom tuning (deploy/node/pynetdicom_tuning.py): applied per accepted association only,
guarded by the pinned version; and the node advertises the configured maximum PDU size."""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import pytest
import pynetdicom.association as pn_association
import pynetdicom.dul as pn_dul
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, evt

import deploy.node.logs as node_logs
from deploy.node import pynetdicom_tuning as tuning
from deploy.node.config import parse_config
from deploy.node.service import Node


@pytest.fixture
def log_buffer(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(node_logs, "_streams", [buf])
    return buf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mr() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientName = "MR", "Test"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_other_pynetdicom_version_is_left_alone_with_one_warning(log_buffer: io.StringIO) -> None:
    assert tuning.unsupported_reason() is None  # the pinned 3.0.4 is installed
    assert "3.0.5" in tuning.unsupported_reason("3.0.5")
    assert tuning.conn_open_handlers(version="3.0.5") == []
    assert tuning.conn_open_handlers(enabled=False) == []
    events = [json.loads(line)["event"] for line in log_buffer.getvalue().splitlines()]
    assert events == ["pynetdicom_tuning_skipped"]  # disabled: no warning, wrong version: one
    handlers = tuning.conn_open_handlers()
    assert len(handlers) == 1 and handlers[0][0] is evt.EVT_CONN_OPEN


def test_guard_refuses_a_reactor_without_the_sleep(monkeypatch) -> None:
    def no_sleep(self) -> None:
        return None
    monkeypatch.setattr(pn_association.Association, "_run_reactor", no_sleep)
    assert "time.sleep" in tuning.unsupported_reason()


def test_accepted_associations_are_tuned_and_pynetdicom_itself_is_not() -> None:
    seen: list[tuple] = []

    def on_store(event) -> int:
        a = event.assoc
        seen.append((a._run_reactor.__func__, a.dul.run_reactor.__func__, a.dul._run_loop_delay))
        return 0x0000

    scp = AE("TUNED")
    scp.add_supported_context(MRImageStorage, ExplicitVRLittleEndian)
    server = scp.start_server(("127.0.0.1", 0), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store),
                                            *tuning.conn_open_handlers(dul_delay=0.0002)])
    try:
        scu = AE("SCU")
        scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="TUNED")
        assert assoc.is_established
        statuses = [assoc.send_c_store(mr()).Status for _ in range(3)]
        requestor = (assoc._run_reactor.__func__, assoc.dul._run_loop_delay)
        assoc.release()
    finally:
        server.shutdown()
    assert statuses == [0, 0, 0]
    assert seen == [(tuning._FAST_REACTOR, tuning._FAST_DUL_REACTOR, 0.0002)] * 3
    # the requestor (the node's sender uses one) and the classes / modules are untouched
    assert requestor == (pn_association.Association._run_reactor, 0.001)
    assert pn_association.time is time and pn_dul.time is time
    assert tuning._FAST_REACTOR.__globals__["time"] is not time
    assert pn_association.Association._run_reactor is not tuning._FAST_REACTOR


@pytest.mark.parametrize("pdu, fast", [(0, True), (65536, False)])
def test_node_advertises_configured_pdu_size_and_tunes_when_asked(tmp_path: Path, pdu: int,
                                                                  fast: bool) -> None:
    cfg = parse_config({"ae_title": "CMB_NODE", "port": free_port(), "bind": "127.0.0.1",
                        "spool": str(tmp_path / "spool"), "min_free_mb": 1,
                        "association": {"maximum_pdu_size": pdu, "fast_polling": fast}}, tmp_path)
    node = Node(cfg)  # runs no app: no study completes within study_quiet_seconds (30 s)
    node.start()
    try:
        scu = AE("SCU")
        scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", node.server.server_address[1], ae_title="CMB_NODE")
        assert assoc.is_established
        advertised = assoc.acceptor.maximum_length
        accepted = node.server.active_associations
        tuned = [a._run_reactor.__func__ is tuning._FAST_REACTOR for a in accepted]
        assert assoc.send_c_store(mr()).Status == 0
        assoc.release()
    finally:
        node.stop()
    assert advertised == pdu
    assert tuned == [fast]
