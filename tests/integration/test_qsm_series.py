"""The QSM map as a derived MR series: round trip, geometry, stable UIDs, DICOM validity, SimpleITK."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.dicom.derived import WINDOW_PPM, choose_slope, read_qsm_series, write_qsm_series
from core.dicom.reader import load_gre
from core.errors import DicomInputError
from core.report.keyimages import QSM_WINDOW_PPM
from core.uids import is_valid_uid
from tests.unit.test_dicom_roundtrip import SHAPE, make_study
from training.sim.dicom_writer import write_study

WHEN = dt.datetime(2025, 3, 4, 10, 20, 30)


def known_chi(shape=SHAPE) -> np.ndarray:
    """A smooth +-0.9 ppm pattern plus a few strong voxels (vein-like 1.5 ppm, calcification -1.2)."""
    i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    chi = 0.9 * np.sin(i / 3.0) * np.cos(j / 4.0) * np.cos(k / 5.0)
    chi[3, 4, 5], chi[10, 11, 2] = 1.5, -1.2
    return chi


@pytest.fixture(scope="module")
def gre(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gre")
    write_study(make_study(2), folder, "siemens")
    return load_gre(folder), folder


@pytest.fixture(scope="module")
def written(gre, tmp_path_factory):
    vol, _ = gre
    folder = tmp_path_factory.mktemp("qsm")
    paths = write_qsm_series(known_chi(), vol, folder, method="STAR-QSM", algorithm_version="1.0.0",
                             content_datetime=WHEN)
    return paths, folder


def test_values_and_geometry_survive(gre, written):
    vol, _ = gre
    paths, folder = written
    assert len(paths) == SHAPE[2]
    chi, geom = read_qsm_series(folder)
    assert chi.shape == SHAPE
    ds0 = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert float(ds0.RescaleSlope) == 0.5 and ds0.RescaleType == "PPB"  # ppb after the Modality LUT
    slope = ds0.RealWorldValueMappingSequence[0].RealWorldValueSlope
    assert slope == 0.0005  # ppm per stored unit
    err = np.abs(chi - known_chi())
    assert err.max() <= slope / 2 + 1e-9, err.max()
    assert err.max() > 0  # it really was quantised (the test would notice float storage)
    np.testing.assert_allclose(geom.affine, vol.geometry.affine, atol=1e-4)
    assert np.abs(vol.geometry.direction[:, 2] - [0, 0, 1]).max() > 0.05  # the grid is oblique
    assert geom.frame_of_reference_uid == vol.geometry.frame_of_reference_uid


def test_headers_link_to_the_source(gre, written):
    vol, _ = gre
    paths, _ = written
    src0 = vol.source_datasets[0]
    series = set()
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        series.add(ds.SeriesInstanceUID)
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "QSM"]
        assert ds.StudyInstanceUID == vol.study_instance_uid == src0.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src0.FrameOfReferenceUID
        assert (ds.PatientID, str(ds.PatientName), ds.PatientBirthDate) == (
            src0.PatientID, str(src0.PatientName), src0.PatientBirthDate)
        assert ds.AccessionNumber == src0.AccessionNumber
        assert ds.Manufacturer == "CMB-QSM open source" and ds.SoftwareVersions == "1.0.0"
        assert ds.SeriesDescription == "QSM STAR-QSM (ppb)" and ds.SeriesNumber == 900
        assert ds.BurnedInAnnotation == "NO"
        # -0.3..+0.5 ppm for the default LINEAR function, in ppb: c - 0.5 -+ (w - 1) / 2 = -300, 500
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (100.5, 801.0)
        assert "VOILUTFunction" not in ds  # OHIF 3.13 mishandles LINEAR_EXACT
        assert WINDOW_PPM == QSM_WINDOW_PPM == (-0.3, 0.5)  # the series looks like the key images
        assert float(ds.RescaleIntercept) == 0.0 and ds.PixelRepresentation == 1
        rwvm = ds.RealWorldValueMappingSequence[0]
        assert rwvm.RealWorldValueSlope * 1000 == float(ds.RescaleSlope)
        assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "[ppm]"
        assert (ds.ContentDate, ds.ContentTime[:6]) == ("20250304", "102030")
        assert vol.phase_series_uid in ds.DerivationDescription
        assert "STAR-QSM" in ds.DerivationDescription
        assert ds.InstanceNumber == k + 1
        # slice k references the first-echo magnitude image at the same position
        ref = ds.SourceImageSequence[0]
        src = vol.source_datasets[k]
        assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   [float(v) for v in src.ImagePositionPatient], atol=1e-4)
        assert is_valid_uid(ds.SOPInstanceUID) and is_valid_uid(ds.SeriesInstanceUID)
        assert ds.pixel_array.shape == (SHAPE[1], SHAPE[0])
    assert len(series) == 1
    assert series.pop() not in (vol.magnitude_series_uid, vol.phase_series_uid)


def _uids(paths):
    out = []
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append((ds.SeriesInstanceUID, ds.SOPInstanceUID))
    return out


def test_writing_twice_gives_identical_uids_and_pixels(gre, written, tmp_path):
    vol, _ = gre
    paths, _ = written
    again = write_qsm_series(known_chi(), vol, tmp_path / "again", method="STAR-QSM", algorithm_version="1.0.0")
    assert _uids(again) == _uids(paths)
    assert [pydicom.dcmread(p).PixelData for p in again] == [pydicom.dcmread(p).PixelData for p in paths]
    sop = [u for _, u in _uids(paths)]
    assert len(set(sop)) == len(sop)


def test_other_version_or_method_gives_a_new_series(gre, written, tmp_path):
    vol, _ = gre
    paths, _ = written
    first = _uids(paths)
    newer = _uids(write_qsm_series(known_chi(), vol, tmp_path / "v2", method="STAR-QSM", algorithm_version="1.0.1"))
    tkd = _uids(write_qsm_series(known_chi(), vol, tmp_path / "tkd", method="TKD", algorithm_version="1.0.0"))
    lbv_paths = write_qsm_series(known_chi(), vol, tmp_path / "lbv", method="STAR-QSM", algorithm_version="1.0.0",
                                 background="LBV")
    lbv = _uids(lbv_paths)
    for other in (newer, tkd, lbv):
        assert other[0][0] != first[0][0]
        assert not ({u for _, u in other} & {u for _, u in first})
    assert newer[0][0] != tkd[0][0]
    assert "after LBV background field removal" in pydicom.dcmread(lbv_paths[0]).DerivationDescription
    assert "after V-SHARP background field removal" in pydicom.dcmread(paths[0]).DerivationDescription


@pytest.mark.dicom_tools
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_errors(written):
    paths, _ = written
    errors = []
    for p in paths:
        run = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=60)
        text = run.stdout + run.stderr
        assert "MRImage" in text
        errors += [f"{p.name}: {line}" for line in text.splitlines() if line.startswith("Error")]
    assert errors == [], errors[:5]


def test_simpleitk_reads_geometry_and_rescaled_values(gre, written):
    sitk = pytest.importorskip("SimpleITK")
    vol, _ = gre
    _, folder = written
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(files) == SHAPE[2]
    reader.SetFileNames(files)
    img = reader.Execute()
    g = vol.geometry
    assert img.GetSize() == SHAPE
    np.testing.assert_allclose(img.GetOrigin(), g.origin, atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), g.spacing, atol=1e-5)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), g.direction, atol=1e-6)
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)).astype(np.float64)
    assert np.abs(arr - 1000 * known_chi()).max() <= 0.5 / 2 + 1e-3  # SimpleITK applies the ppb Modality LUT


def test_a_series_rescaled_in_ppm_reads_as_ppm(written, tmp_path):
    """A map whose Modality LUT is in ppm (a scanner's, or ours before the ppb change) is read as ppm;
    mixing ppb and ppm slices is refused."""
    paths, _ = written
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.RescaleSlope, ds.RescaleType = "0.0005", "US"
        ds.save_as(tmp_path / p.name)
    chi, _ = read_qsm_series(tmp_path)
    assert np.abs(chi - known_chi()).max() <= 0.0005 / 2 + 1e-9
    shutil.copy(paths[0], tmp_path / paths[0].name)
    with pytest.raises(DicomInputError, match="mixes RescaleType PPB"):
        read_qsm_series(tmp_path)


def test_large_values_widen_the_slope_instead_of_clipping(gre, tmp_path):
    vol, _ = gre
    chi = known_chi() * 40.0  # +-60 ppm: beyond the +-16.38 ppm of the default slope
    chi[0, 0, 0] = np.nan
    assert choose_slope(chi) == 0.002
    paths = write_qsm_series(chi, vol, tmp_path, method="TKD", algorithm_version="1.0.0")
    assert float(pydicom.dcmread(paths[0], stop_before_pixels=True).RescaleSlope) == 2.0  # ppb
    back, _ = read_qsm_series(tmp_path)
    assert back[0, 0, 0] == 0.0
    finite = np.isfinite(chi)
    assert np.abs(back[finite] - chi[finite]).max() <= 0.001 + 1e-9


def test_gre_loader_ignores_a_qsm_series_in_the_input(gre, tmp_path):
    vol, folder = gre
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    write_qsm_series(known_chi(), vol, mixed / "qsm", method="STAR-QSM", algorithm_version="1.0.0")
    again = load_gre(mixed)
    assert again.magnitude_series_uid == vol.magnitude_series_uid
    assert again.phase_series_uid == vol.phase_series_uid
    np.testing.assert_array_equal(again.phase_rad, vol.phase_rad)


def test_refuses_a_map_on_another_grid(gre, tmp_path):
    vol, _ = gre
    with pytest.raises(ValueError, match="differs from the acquisition grid"):
        write_qsm_series(np.zeros((4, 4, 4)), vol, tmp_path, method="TKD", algorithm_version="1.0.0")
    with pytest.raises(ValueError, match="unknown QSM method"):
        write_qsm_series(known_chi(), vol, tmp_path, method="MEDI", algorithm_version="1.0.0")


def test_reader_needs_a_choice_when_two_qsm_series_share_a_folder(gre, tmp_path):
    vol, _ = gre
    star = write_qsm_series(known_chi(), vol, tmp_path / "a", method="STAR-QSM", algorithm_version="1.0.0")
    write_qsm_series(-known_chi(), vol, tmp_path / "b", method="TKD", algorithm_version="1.0.0")
    with pytest.raises(DicomInputError, match="found 2"):
        read_qsm_series(tmp_path)
    uid = pydicom.dcmread(star[0], stop_before_pixels=True).SeriesInstanceUID
    chi, _ = read_qsm_series(tmp_path, uid)
    assert np.abs(chi - known_chi()).max() <= 0.0005 / 2 + 1e-9


@pytest.mark.parametrize("source", ["enhanced-siemens", "classic-ge"])
def test_other_sources_give_valid_series_on_their_grid(source, tmp_path):
    from training.sim.enhanced_writer import write_enhanced_study

    study = make_study(2)
    if source == "enhanced-siemens":
        write_enhanced_study(study, tmp_path / "in", "siemens")
    else:
        write_study(study, tmp_path / "in", "ge")
    vol = load_gre(tmp_path / "in")
    paths = write_qsm_series(known_chi(), vol, tmp_path / "qsm", method="TKD", algorithm_version="1.0.0")
    chi, geom = read_qsm_series(tmp_path / "qsm")
    assert np.abs(chi - known_chi()).max() <= 0.0005 / 2 + 1e-9
    np.testing.assert_allclose(geom.affine, study.geometry.affine, atol=1e-4)
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.source_datasets[0].SOPInstanceUID
    if shutil.which("dciodvfy") is not None:
        run = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert errors == []
