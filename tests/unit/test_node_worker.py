"""Workers (app run on a snapshot: success, failure, timeout, no output) and the sender (back-off
on a closed port, delivery to an in-process pynetdicom Storage SCP)."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from deploy.node.config import parse_config
from deploy.node.queue import Queue
from deploy.node.scheduler import Scheduler
from deploy.node.sender import Sender
from deploy.node.spool import Spool
from deploy.node.worker import Worker, stop_orphan_app

from .test_node_scp import FakeEvent, mr
from deploy.node.scp import StoreHandler

COPY_APP = """import sys, shutil, pathlib
inp, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
files = sorted(inp.rglob('*.dcm'))
print('inputs', len(files))
shutil.copy(files[0], out / 'result.dcm')
(out / 'notes.txt').write_text('not dicom')
"""
FAIL_APP = "import sys; print('loading'); print('no phase series found'); sys.exit(3)"
SLEEP_APP = "import time; time.sleep(30)"
SILENT_APP = "print('did nothing')"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def setup(tmp_path: Path, script: str, **cfg_extra):
    (tmp_path / "app.py").write_text(script)
    data = {"ae_title": "NODE", "port": 11112, "spool": "spool", "study_quiet_seconds": 1,
            "app": {"command": [sys.executable, str(tmp_path / "app.py"), "{input}", "{output}"],
                    "timeout_seconds": cfg_extra.pop("timeout", 20), "max_attempts": 2,
                    "require_dicom_results": cfg_extra.pop("require_dicom", True)},
            "retry": {"backoff_base_seconds": 2, "backoff_max_seconds": 8}}
    data.update(cfg_extra)
    cfg = parse_config(data, tmp_path)
    clock = Clock()
    sp = Spool(cfg.spool)
    q = Queue(sp.db_path)
    handler = StoreHandler(sp, q, clock)
    for comp in ("M", "P"):
        ds = mr(series="1.2.3.4" if comp == "M" else "1.2.3.5", image_type=("ORIGINAL", "PRIMARY", comp))
        assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == 0
    clock.t += 1
    assert Scheduler(q, cfg.triggers, cfg.study_quiet_seconds, clock).tick() == [(1, "queued")]
    done = threading.Event()
    worker = Worker("w", cfg, sp, q, threading.Event(), done.set, clock)
    return cfg, sp, q, worker, clock, done


def test_worker_runs_app_on_snapshot_and_queues_dicom_results(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = setup(
        tmp_path, COPY_APP, destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}])
    assert worker.run_once() is True
    snap = q.snapshot()
    job = snap["jobs"][0]
    assert (job["state"], job["n_instances"], job["n_results"], job["attempts"]) == ("done", 2, 1, 1)
    assert done.is_set()
    attempt = sp.job_dir(1) / "attempt-1"
    inputs = sorted(p.relative_to(attempt / "input").parts[0] for p in (attempt / "input").rglob("*.dcm"))
    assert inputs == ["1.2.3.4", "1.2.3.5"]
    assert (attempt / "app.log").read_text().strip() == "inputs 2"
    (d,) = snap["deliveries"]  # notes.txt is not DICOM: not delivered
    assert (d["result_path"], d["destination"], d["state"]) == (
        "jobs/1/attempt-1/output/result.dcm", "PACS@127.0.0.1:1", "pending")
    assert worker.run_once() is False


def test_worker_failure_is_retried_then_failed_with_the_apps_last_line(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = setup(tmp_path, FAIL_APP)
    worker.run_once()
    job = q.snapshot()["jobs"][0]
    assert (job["state"], job["attempts"]) == ("queued", 1)
    worker.run_once()
    job = q.snapshot()["jobs"][0]
    assert (job["state"], job["attempts"], job["reason"]) == (
        "failed", 2, "app exited with code 3: no phase series found")
    assert not done.is_set()


def test_worker_kills_app_after_timeout(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = setup(tmp_path, SLEEP_APP, timeout=0.5)
    worker.run_once()
    job = q.snapshot()["jobs"][0]
    assert (job["state"], job["reason"]) == ("queued", "app timed out after 0.5 s (killed)")
    assert job["app_pid"] > 0


def test_worker_with_no_dicom_output_fails(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = setup(tmp_path, SILENT_APP)
    worker.run_once()
    assert q.snapshot()["jobs"][0]["reason"] == "app exited 0 but wrote no DICOM file"


def test_worker_with_no_dicom_output_is_done_when_results_are_optional(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = setup(
        tmp_path, SILENT_APP, require_dicom=False,
        destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}])
    assert cfg.app.require_dicom_results is False
    worker.run_once()
    snap = q.snapshot()
    job = snap["jobs"][0]
    assert (job["state"], job["n_results"], job["reason"]) == ("done", 0, "the app wrote no DICOM result")
    assert snap["deliveries"] == [] and done.is_set()


def test_sender_backs_off_then_delivers_to_a_storage_scp(tmp_path: Path) -> None:
    port = free_port()
    cfg, sp, q, worker, clock, done = setup(
        tmp_path, COPY_APP, destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        association={"acse_timeout": 3, "dimse_timeout": 3, "network_timeout": 3})
    worker.run_once()
    sender = Sender(cfg, sp, q, clock)
    # nobody listens yet: attempt 1 fails, next attempt 2 s later (base), then 4 s
    assert sender.run_once() == 1
    (d,) = q.snapshot()["deliveries"]
    assert (d["state"], d["attempts"], d["next_attempt_at"]) == ("pending", 1, clock.t + 2)
    assert d["last_error"] == (f"no association with PACS@127.0.0.1:{port} "
                               "(connection refused, network error or abort)")
    assert sender.run_once() == 0            # not due yet
    clock.t += 2
    assert sender.run_once() == 1
    assert q.snapshot()["deliveries"][0]["next_attempt_at"] == clock.t + 4

    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        clock.t += 4
        assert sender.run_once() == 1
    finally:
        server.shutdown()
    snap = q.snapshot()
    assert (snap["deliveries"][0]["state"], snap["deliveries"][0]["attempts"]) == ("delivered", 3)
    assert snap["jobs"][0]["state"] == "delivered"
    result = pydicom.dcmread(sp.root / snap["deliveries"][0]["result_path"])
    assert received == [result.SOPInstanceUID]


def test_stop_orphan_app_kills_only_a_process_naming_the_attempt_folder(tmp_path: Path) -> None:
    import subprocess
    attempt = tmp_path / "jobs" / "3" / "attempt-1"
    attempt.mkdir(parents=True)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", str(attempt / "input")],
                              start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert stop_orphan_app(other.pid, attempt) is False      # pid reused by someone else
        assert stop_orphan_app(None, attempt) is False
        assert stop_orphan_app(orphan.pid, attempt) is True
        assert orphan.wait(timeout=10) == -9
        assert other.poll() is None
    finally:
        for p in (orphan, other):
            if p.poll() is None:
                p.kill()
                p.wait()


PRESTART_APP = """import json, os, shutil, sys, pathlib, time
print('prestarted', os.getpid(), flush=True)
line = sys.stdin.readline()
if not line.strip():
    sys.exit(0)
job = json.loads(line)
inp, out = pathlib.Path(job['input']), pathlib.Path(job['output'])
files = sorted(inp.rglob('*.dcm'))
print('job inputs', len(files), flush=True)
shutil.copy(files[0], out / 'result.dcm')
"""


def _prestart_setup(tmp_path: Path, script: str):
    (tmp_path / "pre.py").write_text(script)
    return setup(tmp_path, COPY_APP, destinations=[{"ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
                 app={"command": [sys.executable, str(tmp_path / "app.py"), "{input}", "{output}"],
                      "prestart_command": [sys.executable, str(tmp_path / "pre.py")],
                      "timeout_seconds": 20, "max_attempts": 2})


def test_prestarted_app_gets_the_job_on_stdin_and_a_new_one_is_started(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = _prestart_setup(tmp_path, PRESTART_APP)
    assert cfg.app.prestart_command == (sys.executable, str(tmp_path / "pre.py"))
    worker._prestart()
    first = worker._ready[0]
    assert worker.run_once() is True
    job = q.snapshot()["jobs"][0]
    assert job["state"] == "done" and job["n_results"] == 1, job
    log = (sp.job_dir(1) / "attempt-1" / "app.log").read_text()
    assert log.splitlines() == [f"prestarted {first.pid}", "job inputs 2"]  # the prestarted one ran it
    assert job["app_pid"] is None or job["app_pid"] == first.pid
    assert not (sp.jobs / "prestart-w.log").read_text().startswith(f"prestarted {first.pid}")
    second = worker._ready[0]
    assert second.pid != first.pid and second.poll() is None  # the next one waits for its job
    worker.stop()
    assert second.wait(timeout=10) == 0  # end-of-file on stdin: it exits without doing anything


def test_dead_prestarted_app_falls_back_to_the_command(tmp_path: Path) -> None:
    cfg, sp, q, worker, clock, done = _prestart_setup(tmp_path, "import sys; sys.exit(7)")
    worker._prestart()
    worker._ready[0].wait(timeout=10)
    assert worker.run_once() is True
    job = q.snapshot()["jobs"][0]
    assert job["state"] == "done" and job["n_results"] == 1
    assert "inputs 2" in (sp.job_dir(1) / "attempt-1" / "app.log").read_text()  # COPY_APP ran
    worker.stop()


def test_prestart_config(tmp_path: Path) -> None:
    from deploy.node.config import DEFAULT_PRESTART_COMMAND, ConfigError

    base = {"ae_title": "NODE", "port": 11112, "spool": "spool"}
    assert parse_config(base, tmp_path).app.prestart_command == DEFAULT_PRESTART_COMMAND
    custom = {"command": ["x", "{input}", "{output}"]}
    assert parse_config({**base, "app": custom}, tmp_path).app.prestart_command is None
    assert parse_config({**base, "app": {"prestart_command": None}}, tmp_path).app.prestart_command is None
    with pytest.raises(ConfigError, match="no {input}"):
        parse_config({**base, "app": {**custom, "prestart_command": ["x", "{input}"]}}, tmp_path)
    with pytest.raises(ConfigError, match="prestart_command"):
        parse_config({**base, "app": {"prestart_command": "python -m app"}}, tmp_path)
