"""Cohort runs on a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on
loopback (one thread each, the repository on PYTHONPATH), driven by ``training.predict`` and
``training.dataset`` with ``--cluster tcp://...`` on a simulated 3 mm cohort (simulated data).

Checked: the findings are byte-identical to the in-process run with the same torch thread count,
a second run skips every finished subject (files untouched), a subject missing one output is run
again, and a subject with a corrupt DICOM folder is reported while the others finish (exit 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from training import dataset as D
from training import predict as P
from training import simulate as S

pytestmark = pytest.mark.slow  # ~160 s on 2 shared cores: two cohorts through QSM + detection, 4 ways

GOOD = ("sub-000", "sub-001")
BAD = "sub-bad"


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    fh = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=log.parent, env=env, stdout=fh,
                            stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """Address of a scheduler with two one-thread workers, all separate processes on 127.0.0.1."""
    from distributed import Client

    d = tmp_path_factory.mktemp("dask")
    sfile = d / "scheduler.json"
    procs = [_start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--scheduler-file", str(sfile)], d / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not sfile.exists() or not sfile.read_text().strip():
            assert procs[0].poll() is None, (d / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not start"
            time.sleep(0.2)
        address = json.loads(sfile.read_text())["address"]
        for i in range(2):
            procs.append(_start(["distributed.cli.dask_worker", address, "--nthreads", "1", "--nworkers", "1",
                                 "--no-dashboard", "--local-directory", str(d / f"w{i}"), "--name", f"w{i}"],
                                d / f"worker{i}.log"))
        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    assert S.main(["--out", str(root), "--subjects", "2", "--seed", "11", "--voxel-mm", "3", "3", "3"]) == 0
    bad = root / BAD / "dicom"
    bad.mkdir(parents=True)
    (bad / "IM0001.dcm").write_bytes(b"this is not a DICOM file\n")
    return root


@pytest.fixture(scope="module")
def sequential(cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("seq")
    assert P.main(["--cohort", str(cohort), "--out", str(out), "--threads", "1", "--no-progress"]) == 1
    return out


def _mtimes(out: Path) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*.json"))}


def test_predict_on_tcp_cluster_equals_sequential_resumes_and_reports_failure(cohort, sequential, scheduler,
                                                                               tmp_path, capsys):
    out = tmp_path / "preds"
    args = ["--cohort", str(cohort), "--out", str(out), "--cluster", scheduler, "--no-progress"]
    capsys.readouterr()
    assert P.main(args) == 1  # the corrupt subject fails, the run goes on
    cap = capsys.readouterr()
    assert f"error: {BAD}: " in cap.err and "2 subject(s) run, 0 already complete (skipped), 1 failed" in cap.err
    err_line = next(ln for ln in cap.err.splitlines() if ln.startswith(f"error: {BAD}: "))
    assert len(err_line) < 400
    assert not (out / BAD / "findings.json").exists()
    for s in GOOD:
        for f in P.OUTPUTS[:2]:
            assert (out / s / f).read_bytes() == (sequential / s / f).read_bytes(), (s, f)
        rec = json.loads((out / s / "detection.json").read_text())
        assert rec["with_resnet"] is True and rec["algorithm_version"].startswith(P.ALGORITHM_VERSION)
        assert rec["seconds"]["total"] > 0
    assert not list(out.rglob("*.tmp"))

    # second run: every finished subject is skipped, its files untouched; the corrupt one fails again
    before = _mtimes(out)
    assert P.main(args) == 1
    cap = capsys.readouterr()
    assert "0 subject(s) run, 2 already complete (skipped), 1 failed" in cap.err
    assert _mtimes(out) == before
    assert P.main([*args, "--subjects", *GOOD]) == 0

    # a subject missing its last output is not finished: it runs again and gives the same findings
    (out / GOOD[1] / "detection.json").unlink()
    assert P.main([*args, "--subjects", *GOOD]) == 0
    after = _mtimes(out)
    assert after[f"{GOOD[0]}/findings.json"] == before[f"{GOOD[0]}/findings.json"]
    assert after[f"{GOOD[1]}/findings.json"] != before[f"{GOOD[1]}/findings.json"]
    assert (out / GOOD[1] / "findings.json").read_bytes() == (sequential / GOOD[1] / "findings.json").read_bytes()

    # a run with another model setting is not taken as finished
    assert P.main([*args, "--subjects", GOOD[0], "--no-resnet"]) == 0
    assert json.loads((out / GOOD[0] / "detection.json").read_text())["with_resnet"] is False


def test_dataset_on_tcp_cluster_equals_sequential_and_summary_reads_back_skipped(scheduler, tmp_path):
    common = ["--subjects", "2", "--seed", "3", "--voxel-mm", "3", "3", "3", "--n-cmb", "4", "--no-progress"]
    seq, dsk = tmp_path / "seq", tmp_path / "dask"
    assert D.main(["--out", str(seq), "--threads", "1", *common]) == 0
    assert D.main(["--out", str(dsk), "--cluster", scheduler, *common]) == 0
    for sid in ("sub0003_000", "sub0003_001"):
        a, b = np.load(seq / f"{sid}.npz"), np.load(dsk / f"{sid}.npz")
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{sid} {k}")
    first = json.loads((dsk / "summary.json").read_text())
    assert [r["subject"] for r in first["subjects"]] == ["sub0003_000", "sub0003_001"] and first["failed"] == []
    shard_mtimes = {p.name: p.stat().st_mtime_ns for p in dsk.glob("sub*")}
    # all skipped: the summary is rebuilt from the shard json files, identical figures
    assert D.main(["--out", str(dsk), "--cluster", scheduler, *common]) == 0
    again = json.loads((dsk / "summary.json").read_text())
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in dsk.glob("sub*")} == shard_mtimes
