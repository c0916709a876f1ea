"""The simulator's DICOM is valid for other readers: dciodvfy (dicom3tools), SimpleITK, pydicom."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.unit.test_dicom_roundtrip import SHAPE, make_study
from training.sim.dicom_writer import write_study

CASES = [("siemens", {}), ("philips", {"philips_phase_units": "rad"}),
         ("philips", {"philips_phase_units": "mrad"}), ("ge", {}), ("siemens", {"omit_echo_numbers": True})]
IDS = ["siemens", "philips-rad", "philips-mrad", "ge", "siemens-no-echo-numbers"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[list[Path], object]]:
    out = {}
    study = make_study(2)
    for name, (vendor, kwargs) in zip(IDS, CASES):
        folder = tmp_path_factory.mktemp(name)
        out[name] = (write_study(study, folder, vendor, **kwargs), study)
    return out


@pytest.mark.dicom_tools
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
@pytest.mark.parametrize("name", IDS)
def test_dciodvfy_reports_no_errors(written, name):
    paths, _ = written[name]
    assert len(paths) == 2 * 2 * SHAPE[2]
    errors = []
    for p in paths:
        run = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
        text = run.stdout + run.stderr
        assert "MRImage" in text  # dciodvfy recognised the IOD
        errors += [f"{p.name}: {line}" for line in text.splitlines() if line.startswith("Error")]
    assert errors == [], errors[:5]


def _sorted_files(paths, component_test, te_ms):
    """One echo of one component, sorted by position along the normal."""
    chosen = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if component_test(ds) and float(ds.EchoTime) == te_ms:
            iop = np.array(ds.ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            chosen.append((float(np.dot(np.array(ds.ImagePositionPatient, float), normal)), p))
    return [str(p) for _, p in sorted(chosen)]


@pytest.mark.parametrize("name", ["siemens", "philips-mrad", "ge"])
def test_simpleitk_reads_one_echo_with_our_geometry(written, name):
    sitk = pytest.importorskip("SimpleITK")
    paths, study = written[name]
    if name == "ge":
        is_first = lambda ds: ds.get_private_item(0x0043, 0x2F, "GEMS_PARM_01").value == 2  # real
    else:
        is_first = lambda ds: "M" in ds.ImageType[2:]
    files = _sorted_files(paths, is_first, 4.0)
    assert len(files) == SHAPE[2]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    img = reader.Execute()
    g = study.geometry
    assert img.GetSize() == SHAPE
    np.testing.assert_allclose(img.GetSpacing(), g.spacing, atol=1e-5)
    np.testing.assert_allclose(img.GetOrigin(), g.origin, atol=1e-4)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), g.direction, atol=1e-6)
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # sitk [k, j, i] -> [i, j, k]
    truth = study.magnitude[0] if name != "ge" else study.magnitude[0] * np.cos(study.phase_rad[0])
    corr = np.corrcoef(arr.ravel(), truth.ravel())[0, 1]
    assert corr > 0.9999


def test_simpleitk_applies_siemens_phase_rescale(written):
    sitk = pytest.importorskip("SimpleITK")
    paths, study = written["siemens"]
    files = _sorted_files(paths, lambda ds: "P" in ds.ImageType[2:], 10.0)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    arr = np.transpose(sitk.GetArrayFromImage(reader.Execute()), (2, 1, 0)).astype(np.float64)
    radians = arr * np.pi / 4096
    d = np.angle(np.exp(1j * (radians - study.phase_rad[1])))
    assert np.abs(d).max() < 1e-3


@pytest.mark.parametrize("name", IDS)
def test_pydicom_reads_every_file(written, name):
    paths, _ = written[name]
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.pixel_array.shape == (SHAPE[1], SHAPE[0])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.Modality == "MR" and ds.BodyPartExamined == "HEAD" and ds.MRAcquisitionType == "3D"
        assert ds.ScanningSequence == "GR"
        assert ("EchoNumbers" in ds) == (name != "siemens-no-echo-numbers")


def test_dcmdump_parses_when_installed(written):
    if shutil.which("dcmdump") is None:
        pytest.skip("dcmdump (DCMTK) is not installed")
    paths, _ = written["ge"]
    run = subprocess.run(["dcmdump", str(paths[0])], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert "GEMS_PARM_01" in run.stdout and "(0043,102f)" in run.stdout.lower()
