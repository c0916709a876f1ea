"""The node with the REAL app: a simulated 3 mm study pushed with storescu, the node runs
``python -m app`` on it, and the job ends 'done'; any DICOM result the app wrote must be stored in
a real Orthanc (today's app writes summary.json + NIfTI, so that part only runs once it writes
DICOM). Runs bench.end_to_end.run_end_to_end, the same code the end-to-end benchmark times.
The quiet period is 30 s and the node's default early start is on: the simulator writes
ImagesInAcquisition and EchoTrainLength, so the job must say it started because both GRE series
were complete, not because the quiet period elapsed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest

from bench.end_to_end import run_end_to_end
from bench.ingest import simulate_study

pytestmark = [pytest.mark.dicom_tools, pytest.mark.slow]


def test_simulated_study_through_node_app_and_orthanc(tmp_path: Path) -> None:
    for tool in ("storescu", "echoscu", "Orthanc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            pytest.skip(f"{tool} is not installed (DCMTK / Orthanc needed for this test)")
    study = simulate_study(tmp_path / "sim", (3.0, 3.0, 3.0))
    files = sorted(study.rglob("*.dcm"))
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    report = run_end_to_end(study, tmp_path / "work", quiet=30.0, timeout=150)

    assert report["instances_sent"] == report["instances_stored"] == len(files)
    assert report["trigger"] == "gre_magnitude_phase"
    # started on completeness (magnitude + phase series), not on the 30 s quiet period
    assert report["start_reason"] == (f"complete: 2 series, {len(files)} instances "
                                      f"({len(files)} in the study)")
    log = (tmp_path / "work" / "node" / "node.log").read_text()
    started = [json.loads(line) for line in log.splitlines()
               if line.startswith("{") and '"study_complete"' in line]
    assert [e["start_reason"] for e in started] == [report["start_reason"]]
    assert report["job_state"] in ("done", "delivered")
    # the app really ran on the node's snapshot of the study
    summary = json.loads((tmp_path / "work" / "node" / "spool" / "jobs" / "1" / "attempt-1"
                          / "output" / "summary.json").read_text())
    assert summary["input"]["study_instance_uid"] == first.StudyInstanceUID
    assert summary["input"]["n_echoes"] == 4
    shape = summary["input"]["geometry"]["shape"]
    assert 2 * 4 * shape[2] == len(files)  # magnitude + phase, 4 echoes, one file per slice
    # every DICOM result the app wrote is in Orthanc, in the input study
    arrived = report["results_in_orthanc"]
    assert len(arrived) == report["n_results"]
    if report["n_results"]:
        assert report["job_state"] == "delivered"
        assert {a["StudyInstanceUID"] for a in arrived} == {first.StudyInstanceUID}
    else:
        assert report["job_state"] == "done"
