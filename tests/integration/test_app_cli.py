"""The app as a user runs it: ``python -m app -i IN -o OUT`` on simulated studies (simulated data)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from app.app import ALGORITHM_VERSION
from tests.conftest import REPO, dciodvfy_errors, run_app

pytestmark = pytest.mark.slow


def _simulate(out: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "training.simulate", "--out", str(out), "--voxel-mm", "3", "3", "3", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    _simulate(out, "--subjects", "3", "--seed", "11", "--vendor", "mixed", "--oblique", "10")
    return out


def test_app_reads_every_vendor_as_simulated(cohort: Path, tmp_path: Path):
    plan = json.loads((cohort / "cohort.json").read_text())["subjects"]
    assert {s["vendor"] for s in plan} == {"siemens", "philips", "ge"}
    for sub in plan:
        out = tmp_path / sub["subject_id"]
        proc = run_app(cohort / sub["subject_id"] / "dicom", out)
        assert proc.returncode == 0, proc.stderr
        summary = json.loads((out / "summary.json").read_text())["input"]
        truth = json.loads((cohort / sub["subject_id"] / "truth" / "truth.json").read_text())
        assert summary["n_echoes"] == sub["echoes"]
        assert summary["geometry"]["shape"] == truth["geometry"]["shape"]
        np.testing.assert_allclose(summary["geometry"]["origin_lps_mm"], truth["geometry"]["origin_lps_mm"], atol=1e-3)
        np.testing.assert_allclose(summary["geometry"]["direction"], truth["geometry"]["direction"], atol=1e-5)
        assert summary["field_strength_t"] == pytest.approx(3.0)
        mag = nib.load(out / "magnitude.nii.gz")
        phase = nib.load(out / "phase.nii.gz")
        assert mag.shape == (*truth["geometry"]["shape"], sub["echoes"])
        ph = np.asarray(phase.dataobj)
        assert ph.min() >= -np.pi - 1e-3 and ph.max() <= np.pi + 1e-3
        # the NIfTI carries the same geometry as the truth maps
        chi = nib.load(cohort / sub["subject_id"] / "truth" / "chi.nii.gz")
        np.testing.assert_allclose(mag.affine, chi.affine, atol=1e-4)
        assert "read" in proc.stdout and "wrote" in proc.stdout
        # QSM: a map on the source grid, and a derived MR series with one instance per slice
        summary_all = json.loads((out / "summary.json").read_text())
        assert summary_all["qsm"]["method"] == "star" and summary_all["qsm"]["seconds"]["total"] > 0
        assert summary_all["qsm"]["background_removal"] == "vsharp"  # what made the local field
        qsm = nib.load(out / "qsm.nii.gz")
        assert qsm.shape == tuple(truth["geometry"]["shape"])
        np.testing.assert_allclose(qsm.affine, chi.affine, atol=1e-4)
        series = sorted((out / "dicom" / "qsm").glob("*.dcm"))
        assert len(series) == truth["geometry"]["shape"][2]
        assert set(summary_all["files"]) >= {"qsm.nii.gz", "brain_mask.nii.gz", "summary.json"}
        for f in (series[0], series[-1]):
            assert dciodvfy_errors(f) == [], f
        # detection, localisation and reports: findings.json and the DICOM results a radiologist opens
        from core.findings import StudyFindings

        findings = StudyFindings.load(out / "findings.json")
        assert findings.study_instance_uid == summary["study_instance_uid"]
        assert summary_all["detection"]["n_microbleeds"] == len(findings.microbleeds)
        assert all(f.kind != "cmb" or f.probability > 0 for f in findings.findings)
        from core.mars import REGION_BY_KEY

        for f in findings.findings:  # a focus outside every atlas region stays unlocalised (None)
            assert f.mars_region is None or REGION_BY_KEY[f.mars_region].category == f.mars_category
        sr = out / "dicom" / "cmb" / "SR_CMB.dcm"
        assert dciodvfy_errors(sr) == []
        from app.app import detection_version

        # the findings and SR name the shipped models (detector.json digest), the QSM series the code
        assert findings.algorithm_version == detection_version() != ALGORITHM_VERSION
        assert pydicom.dcmread(sr).SoftwareVersions == detection_version()
        assert pydicom.dcmread(series[0]).SoftwareVersions == ALGORITHM_VERSION
        if findings.findings:
            assert dciodvfy_errors(out / "dicom" / "cmb" / "SEG_CMB.dcm") == []
            assert len(list((out / "dicom" / "cmb").glob("KEY_*.dcm"))) == len(findings.findings)
        assert (out / "cmb_summary.txt").read_text().startswith("Cerebral microbleeds")


def test_simulator_is_deterministic(cohort: Path, tmp_path: Path):
    again = tmp_path / "again"
    _simulate(again, "--subjects", "1", "--seed", "11", "--vendor", "mixed", "--oblique", "10")
    a = json.loads((cohort / "sub-000" / "truth" / "truth.json").read_text())
    b = json.loads((again / "sub-000" / "truth" / "truth.json").read_text())
    assert a["lesions"] == b["lesions"]
    chi_a = np.asarray(nib.load(cohort / "sub-000" / "truth" / "chi.nii.gz").dataobj)
    chi_b = np.asarray(nib.load(again / "sub-000" / "truth" / "chi.nii.gz").dataobj)
    np.testing.assert_array_equal(chi_a, chi_b)
    fa = sorted(p.relative_to(cohort / "sub-000" / "dicom") for p in (cohort / "sub-000" / "dicom").rglob("*") if p.is_file())
    fb = sorted(p.relative_to(again / "sub-000" / "dicom") for p in (again / "sub-000" / "dicom").rglob("*") if p.is_file())
    assert fa == fb
    assert (cohort / "sub-000" / "dicom" / fa[0]).read_bytes() == (again / "sub-000" / "dicom" / fb[0]).read_bytes()


def test_bad_input_leaves_output_untouched(cohort: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier result")
    # an empty folder
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_app(empty, out)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
    # magnitude without phase: copy only the magnitude files of a Siemens subject
    plan = json.loads((cohort / "cohort.json").read_text())["subjects"]
    siemens = next(s for s in plan if s["vendor"] == "siemens")
    import pydicom

    mag_only = tmp_path / "mag_only"
    mag_only.mkdir()
    for f in (cohort / siemens["subject_id"] / "dicom").rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if "M" in [v.upper() for v in ds.ImageType]:
                shutil.copy(f, mag_only / f.name)
    proc = run_app(mag_only, out)
    assert proc.returncode == 2
    assert "phase" in proc.stderr.lower()
    assert len(proc.stderr.strip().splitlines()) == 1
    # nothing was added to OUT, nothing staged left beside it
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
    # a missing input folder
    proc = run_app(tmp_path / "nope", out)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_volume_too_small_for_qsm_is_refused(tmp_path: Path):
    """A 12 mm acquisition has too few voxels for the V-SHARP kernels: exit 2, one line, nothing in OUT."""
    cmd = [sys.executable, "-m", "training.simulate", "--out", str(tmp_path / "tiny"), "--voxel-mm", "12", "12", "12",
           "--subjects", "1", "--seed", "3"]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=600).returncode == 0
    out = tmp_path / "out"
    proc = run_app(tmp_path / "tiny" / "sub-000" / "dicom", out)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "too small" in proc.stderr
    assert not out.exists()


def test_constant_phase_is_refused(tmp_path: Path):
    """A phase series with one value everywhere (a scanner export fault) is refused before QSM."""
    from training.sim.dicom_writer import write_study
    from training.sim.phantom import simulate_subject

    study = simulate_subject("const", 5, voxel_mm=(4.0, 4.0, 4.0), echo_times_s=[0.006, 0.012])
    study.phase_rad[...] = 0.5
    write_study(study, tmp_path / "dicom", "siemens")
    out = tmp_path / "out"
    proc = run_app(tmp_path / "dicom", out)
    assert proc.returncode == 2, proc.stderr
    assert "phase" in proc.stderr.lower() and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
