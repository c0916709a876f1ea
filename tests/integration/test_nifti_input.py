"""Research inputs through ``python -m app -i DIR`` (kind detected by the app) give the DICOM path's
results: one simulated 4 mm Siemens study, run as scanner DICOM, as NIfTI + JSON written the way
dcm2niix writes them (and by the real dcm2niix when installed), as a precomputed QSM NIfTI with the
magnitude echoes, and as our own QSM DICOM series with the DICOM magnitude series.

Networks are seeded random initialisations with thresholds 0 (tests.integration.test_detector_app),
so every stage I candidate is reported: the comparison is of the chain's behaviour on equal inputs
(same findings, centres, regions, chi), not of detection accuracy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest

from core.dicom.reader import load_gre
from core.findings import StudyFindings
from tests.conftest import dciodvfy_errors, require_tool, run_app
from tests.integration.test_detector_app import _models
from tests.nifti_writer import write_dcm2niix_like
from training.sim.dicom_writer import write_study
from training.sim.phantom import simulate_subject

pytestmark = pytest.mark.slow  # a 4 mm simulation and one app run (~12 s on 2 shared cores) per test


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("nifti_input")
    sim = simulate_subject("nii", 5, voxel_mm=(4, 4, 4), n_cmb=4, n_calc=1, cmb_diameter_mm=(6, 10))
    write_study(sim, root / "dicom", "siemens")
    models = _models(root / "models")
    proc = run_app(root / "dicom", root / "out_dicom", "-m", str(models), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return dict(root=root, models=models, out=root / "out_dicom", gre=load_gre(root / "dicom"))


def _run(study, input_dir: Path, name: str) -> tuple[Path, subprocess.CompletedProcess]:
    out = study["root"] / name
    proc = run_app(input_dir, out, "-m", str(study["models"]), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def _same_findings(a_dir: Path, b_dir: Path) -> int:
    a, b = StudyFindings.load(a_dir / "findings.json"), StudyFindings.load(b_dir / "findings.json")
    assert len(a.findings) == len(b.findings) >= 1
    assert [f.kind for f in a.findings] == [f.kind for f in b.findings]
    np.testing.assert_allclose([f.centre_lps_mm for f in a.findings], [f.centre_lps_mm for f in b.findings], atol=0.5)
    assert [f.mars_region for f in a.findings] == [f.mars_region for f in b.findings]
    assert [f.side for f in a.findings] == [f.side for f in b.findings]
    np.testing.assert_allclose([f.mean_chi_ppm for f in a.findings], [f.mean_chi_ppm for f in b.findings], atol=1e-4)
    return len(a.findings)


def _chi(out: Path) -> np.ndarray:
    img = nib.load(out / "qsm.nii.gz")
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


def test_nifti_gre_gives_the_dicom_findings(study):
    gre = study["gre"]
    nii = study["root"] / "nifti"
    write_dcm2niix_like(nii, gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.geometry)
    out, proc = _run(study, nii, "out_nifti")
    assert "read nifti-gre input, Siemens GRE: 4 echo(es)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["input_kind"] == "nifti-gre"
    assert summary["input"]["phase_scaling"].startswith("NIfTI siemens")
    _same_findings(study["out"], out)
    chi_a, aff_a = _chi(study["out"])
    chi_b, aff_b = _chi(out)
    np.testing.assert_allclose(aff_b, aff_a, atol=1e-4)
    np.testing.assert_allclose(chi_b, chi_a, atol=1e-5)
    # DICOM results: placeholder patient, references resolve to the synthesised magnitude series
    src = sorted((out / "dicom" / "source").glob("MAG_*.dcm"))
    assert len(src) == gre.geometry.shape[2]
    sr = pydicom.dcmread(out / "dicom" / "cmb" / "SR_CMB.dcm")
    mag0 = pydicom.dcmread(src[0])
    assert sr.StudyInstanceUID == mag0.StudyInstanceUID != gre.study_instance_uid
    assert str(sr.PatientName) == f"NIFTI^{sr.PatientID}" == f"NIFTI^{mag0.PatientID}"
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert {pydicom.dcmread(p).SOPInstanceUID for p in src} <= evidence
    for p in (src[0], src[-1], out / "dicom" / "cmb" / "SR_CMB.dcm", out / "dicom" / "cmb" / "SEG_CMB.dcm",
              sorted((out / "dicom" / "qsm").glob("*.dcm"))[0], sorted((out / "dicom" / "cmb").glob("KEY_*.dcm"))[0]):
        assert dciodvfy_errors(p) == [], p


def test_real_dcm2niix_output_gives_the_dicom_findings(study):
    exe = require_tool("dcm2niix")
    nii = study["root"] / "dcm2niix"
    nii.mkdir()
    proc = subprocess.run([exe, "-b", "y", "-z", "y", "-f", "%p_%s", "-o", str(nii), str(study["root"] / "dicom")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(list(nii.glob("*_ph.nii.gz"))) == 4 and len(list(nii.glob("*.json"))) == 8
    # tests.nifti_writer writes what dcm2niix writes
    mine = study["root"] / "mine"
    gre = study["gre"]
    write_dcm2niix_like(mine, gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.geometry)
    for p in sorted(mine.glob("*.nii.gz")):
        a, b = nib.load(p), nib.load(nii / p.name)
        np.testing.assert_array_equal(a.dataobj.get_unscaled(), b.dataobj.get_unscaled())
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
        assert (a.dataobj.slope, a.dataobj.inter) == (b.dataobj.slope, b.dataobj.inter)
    out, _ = _run(study, nii, "out_dcm2niix")
    _same_findings(study["out"], out)
    np.testing.assert_allclose(_chi(out)[0], _chi(study["out"])[0], atol=1e-5)


def test_precomputed_qsm_nifti_gives_the_same_findings(study):
    gre = study["gre"]
    folder = study["root"] / "qsm_nifti"
    write_dcm2niix_like(folder, gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.geometry, only="M")
    shutil.copy(study["out"] / "qsm.nii.gz", folder / "sub-01_Chimap.nii.gz")
    out, proc = _run(study, folder, "out_qsm_nifti")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["input_kind"] == "qsm-nifti" and summary["qsm"]["method"] == "precomputed"
    assert not (out / "dicom" / "qsm").exists()  # the map is the input: no second copy of it
    assert summary["qsm"]["brain_volume_ml"] == json.loads((study["out"] / "summary.json").read_text())["qsm"]["brain_volume_ml"]
    _same_findings(study["out"], out)
    assert dciodvfy_errors(out / "dicom" / "cmb" / "SR_CMB.dcm") == []


def test_precomputed_qsm_dicom_gives_the_same_findings(study):
    folder = study["root"] / "qsm_dicom"
    shutil.copytree(study["out"] / "dicom" / "qsm", folder / "qsm")
    mags = [p for p in (study["root"] / "dicom").rglob("*.dcm") if "M" in pydicom.dcmread(p, stop_before_pixels=True).ImageType[2]]
    assert mags
    for p in mags:
        dest = folder / "gre" / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    out, proc = _run(study, folder, "out_qsm_dicom")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["input_kind"] == "qsm-dicom" and summary["qsm"]["method"] == "precomputed"
    # the series stores int16 * 0.0005 ppm: chi is the DICOM run's to half a step, and the findings are
    # those of the same chain on that quantised map (random thresholds-0 networks react to 0.25 ppb)
    from core.dicom.derived import read_qsm_series
    from core.detect.detector import CMBDetector
    from operators.cmb_detector import detect_study
    from operators.mars_localizer import localize_study

    chi, _ = read_qsm_series(folder / "qsm")
    np.testing.assert_allclose(chi, _chi(study["out"])[0], atol=0.00026)
    np.testing.assert_allclose(_chi(out)[0], chi, atol=1e-6)
    gre = load_gre(study["root"] / "dicom")
    mask = np.asarray(nib.load(study["out"] / "brain_mask.nii.gz").dataobj) > 0
    qsm = SimpleNamespace(chi_ppm=chi.astype(np.float32), mask=mask)
    version = StudyFindings.load(out / "findings.json").algorithm_version
    expected, _, _ = localize_study(gre, qsm, detect_study(CMBDetector.load(study["models"]), gre, qsm, version))
    got = StudyFindings.load(out / "findings.json")
    n = len(got.findings)
    assert n == len(expected.findings) >= 1
    np.testing.assert_allclose([f.centre_lps_mm for f in got.findings], [f.centre_lps_mm for f in expected.findings], atol=0.5)
    assert [f.mars_region for f in got.findings] == [f.mars_region for f in expected.findings]
    sr = pydicom.dcmread(out / "dicom" / "cmb" / "SR_CMB.dcm")
    assert sr.StudyInstanceUID == study["gre"].study_instance_uid  # the scanner study, not a new one
    assert len(list((out / "dicom" / "cmb").glob("KEY_*.dcm"))) == n
    # the DICOM path with the QSM series sent back alongside the full GRE still reconstructs
    both = study["root"] / "gre_and_qsm"
    shutil.copytree(study["root"] / "dicom", both / "gre")
    shutil.copytree(study["out"] / "dicom" / "qsm", both / "qsm")
    from core.dicom.reader import frames_from_dataset, load_datasets
    from core.input_kind import DICOM_GRE, dicom_input_kind

    frames = [f for ds in load_datasets(both) for f in frames_from_dataset(ds)]
    assert dicom_input_kind(frames) == DICOM_GRE


def test_bad_research_input_is_one_line(study, tmp_path):
    gre = study["gre"]
    folder = tmp_path / "phase_only"
    write_dcm2niix_like(folder, gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.geometry, only="P")
    proc = run_app(folder, tmp_path / "out")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and "phase NIfTI found but no magnitude" in lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
