"""The DICOM node against real peers: DCMTK storescu / echoscu / findscu, pynetdicom, Orthanc.

Each test starts the node as a subprocess (``python -m deploy.node``) on a free loopback port with
a temporary config and spool. Instances are tiny MR images generated here with pydicom. The app is
replaced by a *test double* (``APP_TEST_DOUBLE`` below): it copies one input instance to the output
folder with new Series/SOP Instance UIDs, so delivery can be checked without running QSM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from deploy.node import harness
from deploy.node.harness import simulate_power_cut_loss, wait_for

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
NODE_AET = "CMB_NODE"
SCANNER_AET = "SCANNER"

pytestmark = [pytest.mark.dicom_tools, pytest.mark.slow]

APP_TEST_DOUBLE = '''"""TEST DOUBLE of the analysis app (not the product): copy one input instance to the output
folder with a new SeriesInstanceUID / SOPInstanceUID, as a stand-in result to deliver."""
import sys
import time
from pathlib import Path

here = Path(__file__).parent
if (here / "slow").exists():  # lets a test kill the node while the app runs
    (here / "app_sleeping").write_text("")
    time.sleep(60)

import pydicom
from pydicom.uid import generate_uid

inp, out = Path(sys.argv[1]), Path(sys.argv[2])
src = sorted(p for p in inp.rglob("*.dcm"))[0]
ds = pydicom.dcmread(src)
ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.543.")
ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.10.543.")
ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
ds.SeriesDescription = "CMB test double result"
ds.SeriesNumber = 999
ds.save_as(out / "result.dcm", enforce_file_format=True)
(out / "findings.json").write_text("{}")
print("test double wrote", ds.SOPInstanceUID)
'''


def _need(binary: str) -> str:
    path = shutil.which(binary) or (binary if Path(binary).is_file() else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (DCMTK / Orthanc needed for this test)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_mr(path: Path, study: str, series: str, *, component: str = "M", echo: int = 1,
            slice_index: int = 0, size: int = 8, description: str = "GRE multi-echo") -> Dataset:
    """A tiny but valid MR Image Storage instance (one slice of a magnitude or phase echo)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["frame of reference", study])
    ds.PatientName, ds.PatientID = "Node^Test", "NODE0001"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "A1", "1"
    ds.Modality, ds.Manufacturer = "MR", "SIEMENS"
    ds.SeriesDescription = description
    ds.SeriesNumber = 2 if component == "P" else 1
    ds.InstanceNumber = echo * 100 + slice_index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", component, "ND"]
    ds.EchoTime, ds.EchoNumbers = 5.0 * echo, echo
    ds.MagneticFieldStrength, ds.ScanningSequence = 3.0, "GR"
    ds.ImagePositionPatient = [0.0, 0.0, float(slice_index)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if component == "P":
        ds.RescaleSlope, ds.RescaleIntercept = 2, -4096
    rng = np.random.default_rng(echo * 1000 + slice_index)
    ds.PixelData = rng.integers(0, 4095, (size, size), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def make_study(folder: Path, echoes: int = 2, slices: int = 1, size: int = 8) -> list[Path]:
    """A 2-echo magnitude + phase GRE study: echoes x slices x {M, P} files."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    mag, pha = generate_uid(), generate_uid()
    paths = []
    for comp, series in (("M", mag), ("P", pha)):
        for e in range(1, echoes + 1):
            for k in range(slices):
                p = folder / f"{comp}_{e}_{k}.dcm"
                make_mr(p, study, series, component=comp, echo=e, slice_index=k, size=size)
                paths.append(p)
    return paths


class NodeProcess(harness.NodeProcess):
    """The node under test, as a subprocess with its own config, spool and log file."""

    def __init__(self, root: Path, **overrides: object) -> None:
        root.mkdir(parents=True, exist_ok=True)
        port, spool = free_port(), root / "spool"
        cfg = {
            "ae_title": NODE_AET, "port": port, "bind": "127.0.0.1", "spool": str(spool),
            "allowed_calling_aets": [SCANNER_AET, "PYNETDICOM"], "study_quiet_seconds": 1.0,
            "workers": 1, "min_free_mb": 1, "poll_seconds": 0.1,
            "retry": {"max_attempts": "unlimited", "backoff_base_seconds": 0.2,
                      "backoff_max_seconds": 1.0},
            "association": {"acse_timeout": 5, "dimse_timeout": 10, "network_timeout": 10},
        }
        cfg.update(overrides)
        (root / "node.yaml").write_text(yaml.safe_dump(cfg))
        super().__init__(root, root / "node.yaml", port, spool, stop_timeout=10.0)

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)

    def status(self) -> dict:
        out = subprocess.run([PY, "-m", "deploy.node", "--config", str(self.config), "status", "--json"],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

def pynetdicom_store(port: int, datasets: list[Dataset | Path], aet: str = "PYNETDICOM") -> list[int]:
    """C-STORE each dataset (or file) in one association; returns the status codes."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established, "association with the node failed"
    codes = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # files are sent as bytes, not parsed by the sender
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            codes.append(int(status.Status) if status else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return codes


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    n = NodeProcess(tmp_path)
    n.start()
    yield n
    n.stop()


def spool_file(node: NodeProcess, ds: Dataset) -> Path:
    return (node.spool / "instances" / ds.StudyInstanceUID / ds.SeriesInstanceUID
            / f"{ds.SOPInstanceUID}.dcm")


def test_node_stores_from_storescu_and_pynetdicom(node: NodeProcess, tmp_path: Path) -> None:
    storescu = _need("storescu")
    files = make_study(tmp_path / "in", echoes=2, slices=1)          # 4 files, same study
    out = subprocess.run([storescu, "-aet", SCANNER_AET, "-aec", NODE_AET, "127.0.0.1",
                          str(node.port), *map(str, files[:2])],
                         env=dcmtk_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert pynetdicom_store(node.port, [pydicom.dcmread(f) for f in files[2:]]) == [0, 0]

    for f in files:
        src = pydicom.dcmread(f)
        stored = spool_file(node, src)
        assert stored.is_file(), stored
        back = pydicom.dcmread(stored)
        assert back.SOPInstanceUID == src.SOPInstanceUID
        assert back.PixelData == src.PixelData
        assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert list((node.spool / "tmp").iterdir()) == []        # no partial write left behind

    # a duplicate (same UID, same bytes) is acknowledged but not stored twice
    assert pynetdicom_store(node.port, [pydicom.dcmread(files[3])]) == [0]
    assert node.rows("SELECT COUNT(*) FROM instances") == [(4,)]
    assert len(node.events("instance_duplicate")) == 1
    stored_events = node.events("instance_stored")
    assert len(stored_events) == 4
    assert {e["calling_aet"] for e in stored_events} == {SCANNER_AET, "PYNETDICOM"}
    assert {e["study_uid"] for e in stored_events} == {pydicom.dcmread(files[0]).StudyInstanceUID}

    snap = node.status()
    assert [(s["n_instances"]) for s in snap["studies"]] == [4]
    # quiet period (1 s) passes, magnitude + phase matches the trigger; the default app command
    # may fail here (no app in this test), what matters is that the job was queued and attempted
    job = wait_for(lambda: [j for j in node.status()["jobs"] if j["state"] != "received"],
                   20, "the study to complete")[0]
    assert job["trigger"] == "gre_magnitude_phase"
    node.stop()                                   # SIGTERM: a clean stop, exit code 0
    assert node.proc is not None and node.proc.returncode == 0
    assert len(node.events("node_stopped")) == 1


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
def test_node_refuses_unknown_calling_ae_and_hostile_input(node: NodeProcess, tmp_path: Path) -> None:
    echoscu = _need("echoscu")
    ok = subprocess.run([echoscu, "-aet", SCANNER_AET, "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                        env=dcmtk_env(), capture_output=True, text=True, timeout=20)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([echoscu, "-aet", "WRONG", "-aec", NODE_AET, "127.0.0.1", str(node.port)],
                         env=dcmtk_env(), capture_output=True, text=True, timeout=20)
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr + bad.stdout or "rejected" in (bad.stderr + bad.stdout).lower()
    assert node.events("association_rejected")[-1]["calling_aet"] == "WRONG"

    ds = make_mr(tmp_path / "x.dcm", generate_uid(), generate_uid())
    hostile = []
    for study, series in (("../../x", ds.SeriesInstanceUID), (ds.StudyInstanceUID, "1.2/../../../etc"),
                          ("1" * 65, ds.SeriesInstanceUID), ("", ds.SeriesInstanceUID)):
        h = pydicom.dcmread(tmp_path / "x.dcm")
        h.StudyInstanceUID, h.SeriesInstanceUID = study, series
        hostile.append(h)
    # a corrupt payload: a valid data set followed by a sequence whose item is garbage
    corrupt = tmp_path / "corrupt.dcm"
    garbage_sq = b"\xe1\x7f\x10\x00SQ\x00\x00\xff\xff\xff\xff" + b"\x01\x02\x03\x04\x10\x00\x00\x00" + bytes(4)
    corrupt.write_bytes((tmp_path / "x.dcm").read_bytes() + garbage_sq)
    codes = pynetdicom_store(node.port, [*hostile, corrupt])
    assert codes[:4] == [0xC220] * 4
    assert codes[4] == 0xC210, hex(codes[4])   # cannot be decoded
    assert node.alive() and echo_ok(node.port)
    # nothing was written anywhere: not in the spool, not outside it
    assert list((node.spool / "instances").rglob("*.dcm")) == []
    assert not (tmp_path / "x").exists() and not (node.spool / "x").exists()
    assert node.rows("SELECT COUNT(*) FROM instances") == [(0,)]


def test_node_answers_out_of_resources_below_free_space_threshold(tmp_path: Path) -> None:
    n = NodeProcess(tmp_path, min_free_mb=1e12)  # an exabyte: never available
    n.start()
    try:
        ds = make_mr(tmp_path / "a.dcm", generate_uid(), generate_uid())
        assert pynetdicom_store(n.port, [ds]) == [0xA700]
        assert list((n.spool / "instances").rglob("*.dcm")) == []
        assert n.alive()
    finally:
        n.stop()


@pytest.mark.parametrize("journal", [False, True], ids=["fsync_per_instance", "journal"])
def test_node_kill9_mid_push_loses_no_acknowledged_instance(tmp_path: Path, journal: bool) -> None:
    """kill -9 after 10 acknowledgements: after the restart every acknowledged instance is stored
    whole and queued, nothing half-written is in the spool or the queue, tmp/ is empty. With the
    journal, the power cut's loss of un-fsynced files is simulated too and the replay restores
    them."""
    storescu = _need("storescu")
    n = NodeProcess(tmp_path / "n", ingest_journal=journal)
    n.start()
    study, series = generate_uid(), generate_uid()
    files = []
    for k in range(150):
        p = tmp_path / "in" / f"{k:03d}.dcm"
        p.parent.mkdir(exist_ok=True)
        make_mr(p, study, series, slice_index=k, size=128)
        files.append(p)
    sop_of = {str(p): pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    source_of = {sop_of[str(p)]: pydicom.dcmread(p) for p in files}
    push = subprocess.Popen([storescu, "-v", "-aet", SCANNER_AET, "-aec", NODE_AET, "127.0.0.1",
                             str(n.port), *map(str, files)], env=dcmtk_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, acked, current, killed = [], [], None, False
    assert push.stdout is not None
    deadline = time.monotonic() + 60
    for line in push.stdout:
        lines.append(line)
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(sop_of[current])
            if len(acked) == 10 and not killed:
                n.kill9()
                killed = True
        assert time.monotonic() < deadline, "storescu did not finish"
    push.wait(timeout=30)
    assert killed, "".join(lines[-20:])
    assert 10 <= len(acked) < len(files), f"push was not interrupted: {len(acked)} acked"
    assert push.returncode != 0

    damaged = 0
    if journal:
        assert list((n.spool / "journal").glob("seg-*.log")), "no journal segment after kill -9"
        damaged = simulate_power_cut_loss(n.spool)
        assert damaged >= len(acked)  # 150 x 32 KiB fit in one segment: nothing checkpointed yet
    n.start()  # restart on the same spool and queue
    recovered = n.events("node_recovered")[-1]
    assert recovered["journal_files_rewritten"] == damaged
    status = n.status()
    rows = {r[0]: (r[1], r[2]) for r in n.rows("SELECT sop_instance_uid, path, sha256 FROM instances")}
    missing = [s for s in acked if s not in rows]
    assert missing == []
    for sop in acked:
        path = n.spool / "instances" / study / series / f"{sop}.dcm"
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == sop and back.PixelData == source_of[sop].PixelData
    # nothing half-written: every file in the spool is a whole instance with a matching row
    on_disk = sorted((n.spool / "instances").rglob("*.dcm"))
    assert len(on_disk) == len(rows) >= len(acked)
    for f in on_disk:
        back = pydicom.dcmread(f)
        assert back.PixelData == source_of[back.SOPInstanceUID].PixelData, f
        assert rows[back.SOPInstanceUID] == (str(f.relative_to(n.spool)),
                                             hashlib.sha256(f.read_bytes()).hexdigest())
    assert status["studies"][0]["n_instances"] == len(rows)
    assert list((n.spool / "tmp").iterdir()) == []
    if not journal:
        assert not (n.spool / "journal").exists()
    n.stop()
    if journal:  # a clean stop checkpoints the journal: no segment left to replay
        assert list((n.spool / "journal").glob("seg-*.log")) == []


def _orthanc_config(root: Path, dicom_port: int, http_port: int, node_port: int) -> Path:
    cfg = {
        "Name": "test-orthanc", "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
        "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
        "DicomModalities": {"node": [NODE_AET, "127.0.0.1", node_port],
                            "findscu": ["FINDSCU", "127.0.0.1", 1]},
        "Plugins": [], "StableAge": 1,
    }
    path = root / "orthanc.json"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg))
    return path


def _http_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_node_delivers_to_orthanc_after_it_comes_up_and_across_a_restart(tmp_path: Path) -> None:
    orthanc = _need("/usr/sbin/Orthanc")
    findscu = _need("findscu")
    dicom_port, http_port = free_port(), free_port()
    double = tmp_path / "app_test_double.py"
    double.write_text(APP_TEST_DOUBLE)
    n = NodeProcess(tmp_path / "n",
                    destinations=[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
                    app={"command": [PY, str(double), "{input}", "{output}"], "timeout_seconds": 60})
    n.start()
    orthanc_proc = None
    try:
        files = make_study(tmp_path / "in", echoes=2, slices=2)
        assert pynetdicom_store(n.port, files) == [0] * len(files)
        # Orthanc is down: the job runs, the delivery fails and is retried with back-off
        delivery = wait_for(lambda: [d for d in n.status()["deliveries"] if d["attempts"] >= 2],
                            30, "failed delivery attempts")[0]
        assert delivery["state"] == "pending" and "ORTHANC" in delivery["destination"]
        job = n.status()["jobs"][0]
        assert (job["state"], job["trigger"], job["n_instances"], job["n_results"]) == \
            ("done", "gre_magnitude_phase", len(files), 1)
        # kill -9 while the delivery is pending; it must continue after the restart
        n.kill9()
        n.start()
        ocfg = _orthanc_config(tmp_path / "orthanc", dicom_port, http_port, n.port)
        orthanc_proc = subprocess.Popen([orthanc, str(ocfg)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_for(lambda: [j for j in n.status()["jobs"] if j["state"] == "delivered"], 40,
                 "the job to be delivered")
        instances = _http_json(f"http://127.0.0.1:{http_port}/instances")
        assert len(instances) == 1
        tags = _http_json(f"http://127.0.0.1:{http_port}/instances/{instances[0]}/simplified-tags")
        assert tags["SOPInstanceUID"] == delivery["sop_instance_uid"]
        assert tags["SeriesDescription"] == "CMB test double result"
        # and a C-FIND against Orthanc finds the result series
        series_uid = tags["SeriesInstanceUID"]
        found = subprocess.run([findscu, "-v", "-S", "-aet", "FINDSCU", "-aec", "ORTHANC",
                                "-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={tags['StudyInstanceUID']}",
                                "-k", "SeriesInstanceUID", "-k", "SeriesDescription",
                                "127.0.0.1", str(dicom_port)],
                               env=dcmtk_env(), capture_output=True, text=True, timeout=20)
        assert found.returncode == 0, found.stderr
        assert series_uid in found.stdout + found.stderr
        final = n.status()["deliveries"]
        assert [d["state"] for d in final] == ["delivered"]
        assert final[0]["attempts"] >= 3  # at least two failures, then success
    finally:
        n.stop()
        if orthanc_proc is not None:
            orthanc_proc.terminate()
            orthanc_proc.wait(timeout=20)


def test_node_kill9_while_app_runs_requeues_job_and_stops_the_orphan(tmp_path: Path) -> None:
    double = tmp_path / "app_test_double.py"
    double.write_text(APP_TEST_DOUBLE)
    (tmp_path / "slow").write_text("")
    n = NodeProcess(tmp_path / "n", app={"command": [PY, str(double), "{input}", "{output}"],
                                         "timeout_seconds": 120, "max_attempts": 3})
    n.start()
    try:
        files = make_study(tmp_path / "in", echoes=1, slices=1)
        assert pynetdicom_store(n.port, files) == [0, 0]
        wait_for(lambda: (tmp_path / "app_sleeping").exists(), 20, "the app to start")
        job = wait_for(lambda: [j for j in n.status()["jobs"] if j["state"] == "running" and j["app_pid"]],
                       20, "the app pid to be recorded")[0]
        n.kill9()
        orphan = job["app_pid"]
        assert Path(f"/proc/{orphan}").exists()          # the app outlived the node
        (tmp_path / "slow").unlink()
        n.start()
        recovered = n.events("node_recovered")[-1]
        assert recovered["jobs_requeued"] == [job["id"]] and recovered["orphan_apps_killed"] == [job["id"]]
        wait_for(lambda: not Path(f"/proc/{orphan}").exists() or
                 "Z" in Path(f"/proc/{orphan}/stat").read_text().split()[2], 10, "the orphan to die")
        done = wait_for(lambda: [j for j in n.status()["jobs"] if j["state"] == "done"], 30, "the re-run")[0]
        assert (done["id"], done["attempts"], done["n_results"], done["n_instances"]) == (job["id"], 2, 1, 2)
        assert (n.spool / "jobs" / str(job["id"]) / "attempt-2" / "output" / "result.dcm").is_file()
        assert not (n.spool / "jobs" / str(job["id"]) / "attempt-1" / "output" / "result.dcm").exists()
    finally:
        n.stop()


def _make_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA and two certificates it signs (node and client), made with openssl."""
    openssl = _need("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=test-hospital-ca")
    for name in ("node", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "1")
    return {n: folder / n for n in ("ca.crt", "node.crt", "node.key", "client.crt", "client.key")}


def test_node_mutual_tls_accepts_only_clients_with_a_certificate(tmp_path: Path) -> None:
    import ssl
    pki = _make_pki(tmp_path / "pki")
    n = NodeProcess(tmp_path / "n", tls={"cert": str(pki["node.crt"]), "key": str(pki["node.key"]),
                                         "ca": str(pki["ca.crt"])})
    n.start()
    try:
        def echo(with_cert: bool) -> bool:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.crt"]))
            ctx.check_hostname = False
            if with_cert:
                ctx.load_cert_chain(str(pki["client.crt"]), str(pki["client.key"]))
            ae = AE(ae_title="PYNETDICOM")
            ae.add_requested_context(Verification)
            ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.network_timeout = 5
            assoc = ae.associate("127.0.0.1", n.port, ae_title=NODE_AET, tls_args=(ctx, None))
            if not assoc.is_established:
                return False
            ok = assoc.send_c_echo().Status == 0
            ds = make_mr(tmp_path / "tls.dcm", generate_uid(), generate_uid())
            ok = ok and assoc.send_c_store(ds).Status == 0
            assoc.release()
            return ok

        assert echo(with_cert=True) is True
        assert echo(with_cert=False) is False
        assert not echo_ok(n.port)                       # plain TCP is not spoken either
        assert n.alive()
        assert n.rows("SELECT COUNT(*) FROM instances") == [(1,)]
    finally:
        n.stop()


def test_node_concurrent_pushes_and_association_limit(tmp_path: Path) -> None:
    storescu = _need("storescu")
    n = NodeProcess(tmp_path / "n", association={"maximum_associations": 3, "acse_timeout": 5,
                                                 "dimse_timeout": 10, "network_timeout": 10})
    n.start()
    try:
        pushes, expected = [], set()
        for p in range(3):   # three scanners push one series each, at the same time, same study
            study = "1.2.826.0.1.3680043.10.543.77"
            series = generate_uid()
            folder = tmp_path / f"in{p}"
            folder.mkdir()
            for k in range(20):
                ds = make_mr(folder / f"{k}.dcm", study, series, slice_index=k, size=16)
                expected.add(ds.SOPInstanceUID)
            pushes.append(subprocess.Popen(
                [storescu, "-aet", SCANNER_AET, "-aec", NODE_AET, "127.0.0.1", str(n.port),
                 *sorted(map(str, folder.glob("*.dcm")))],
                env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for p in pushes:
            out, _ = p.communicate(timeout=60)
            assert p.returncode == 0, out
        stored = {r[0] for r in n.rows("SELECT sop_instance_uid FROM instances")}
        assert stored == expected
        assert len(list((n.spool / "instances").rglob("*.dcm"))) == 60
        assert n.status()["studies"][0]["n_instances"] == 60
        assert [j["state"] for j in n.status()["jobs"]] in (["received"], ["skipped"])  # magnitude only

        # three associations held open: a fourth is refused, and accepted again once one closes
        held = []
        for _ in range(3):
            ae = AE(ae_title="PYNETDICOM")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", n.port, ae_title=NODE_AET)
            assert assoc.is_established
            held.append(assoc)
        assert echo_ok(n.port) is False
        held.pop().release()
        assert wait_for(lambda: echo_ok(n.port), 10, "a free association slot")
        for assoc in held:
            assoc.release()
    finally:
        n.stop()
