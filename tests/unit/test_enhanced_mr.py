"""Enhanced MR Image Storage: the simulator's multi-frame writer and the loader's frame extraction.

A small oblique multi-echo study is written with :func:`write_enhanced_study`, read back with
pydicom and turned into frames with :func:`frames_from_enhanced`; geometry, echo times, components
and pixel values are compared with the simulated arrays. ``dciodvfy`` validates the files.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.dicom.enhanced import frames_from_enhanced
from core.errors import DicomInputError
from core.geometry import Geometry
from training.sim.enhanced_writer import ENHANCED_MR_IMAGE_STORAGE, write_enhanced_study
from training.sim.study import Acquisition, SimulatedStudy

SHAPE = (24, 20, 8)
TES_S = [0.004, 0.0115, 0.019]


def _study() -> SimulatedStudy:
    geom = Geometry.oblique(SHAPE, (0.9, 1.1, 2.0), tilt_deg=15.0, centre_lps=(3.0, -12.0, 25.0))
    rng = np.random.default_rng(42)
    ne = len(TES_S)
    mag = rng.uniform(100.0, 1000.0, size=(ne, *SHAPE)).astype(np.float32)
    phase = rng.uniform(-np.pi, np.pi, size=(ne, *SHAPE)).astype(np.float32)
    # the wrap edges must survive quantisation: -pi and just below +pi
    phase[:, 0, 0, :] = -np.pi
    phase[:, 1, 0, :] = np.float32(np.pi - 1e-4)
    return SimulatedStudy(
        subject_id="enh001", seed=5, geometry=geom, acquisition=Acquisition(list(TES_S)),
        magnitude=mag, phase_rad=phase, chi_ppm=np.zeros(SHAPE, np.float32),
        brain_mask=np.ones(SHAPE, bool),
    )


@pytest.fixture(scope="module")
def study() -> SimulatedStudy:
    return _study()


@pytest.fixture(scope="module")
def written(study, tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("enhanced")
    return {v: write_enhanced_study(study, root / v, v) for v in ("siemens", "philips", "ge")}


def _wrapped(a: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * a))


def _volume(frames, study: SimulatedStudy) -> tuple[np.ndarray, np.ndarray]:
    """Stack frames into rescaled [echo, i, j, k] by echo time and slice location (not frame order)."""
    tes = sorted({f.echo_time_ms for f in frames})
    stored = np.zeros((len(tes), *study.geometry.shape))
    rescaled = np.zeros_like(stored)
    for e, te in enumerate(tes):
        stack = sorted((f for f in frames if f.echo_time_ms == te), key=lambda f: f.slice_location())
        assert len(stack) == study.geometry.shape[2]
        for k, f in enumerate(stack):
            np.testing.assert_allclose(f.position, study.geometry.slice_position(k), atol=1e-5)
            px = f.pixels().T.astype(np.float64)  # [row, col] -> [i, j]
            stored[e, :, :, k] = px
            rescaled[e, :, :, k] = px * f.rescale_slope + f.rescale_intercept
    return stored, rescaled


@pytest.mark.parametrize("vendor", ["siemens", "philips"])
def test_magnitude_and_phase_round_trip(study, written, vendor):
    mag_path, phase_path = written[vendor]
    mag_frames = frames_from_enhanced(pydicom.dcmread(mag_path))
    phase_frames = frames_from_enhanced(pydicom.dcmread(phase_path))
    n = len(TES_S) * SHAPE[2]
    assert len(mag_frames) == n and len(phase_frames) == n
    assert [f.frame_number for f in phase_frames] == list(range(1, n + 1))
    assert {f.component for f in mag_frames} == {"M"}
    assert {f.component for f in phase_frames} == {"P"}

    geom = study.geometry
    for f in mag_frames + phase_frames:
        assert (f.rows, f.columns) == (SHAPE[1], SHAPE[0])
        np.testing.assert_allclose(f.orientation, geom.image_orientation(), atol=1e-9)
        np.testing.assert_allclose(f.pixel_spacing, geom.pixel_spacing(), atol=1e-9)
        assert f.slice_thickness == pytest.approx(2.0)
        assert f.field_strength_t == pytest.approx(3.0)
        assert f.frame_of_reference_uid == phase_frames[0].frame_of_reference_uid
        assert f.acquisition_key == "1"
        assert f.image_type[:2] == ("ORIGINAL", "PRIMARY")
    # echo times in ms, and the echo index of the declared echo dimension follows them
    np.testing.assert_allclose(sorted({f.echo_time_ms for f in phase_frames}), np.array(TES_S) * 1e3)
    for f in phase_frames:
        assert TES_S[f.echo_number - 1] * 1e3 == pytest.approx(f.echo_time_ms)

    # a Geometry rebuilt from the frames is the simulator's geometry
    first = min((f for f in phase_frames if f.echo_number == 1), key=lambda f: f.slice_location())
    rebuilt = Geometry.from_dicom(first.rows, first.columns, first.orientation, first.position,
                                  first.pixel_spacing, 2.0, SHAPE[2])
    np.testing.assert_allclose(rebuilt.affine, geom.affine, atol=1e-5)

    stored, rescaled = _volume(phase_frames, study)
    assert stored.min() >= 0 and stored.max() <= 4095
    f0 = phase_frames[0]
    if vendor == "siemens":
        assert (f0.rescale_slope, f0.rescale_intercept) == (2.0, -4096.0)
        phase = rescaled * np.pi / 4096.0
    else:
        assert f0.rescale_slope == pytest.approx(2 * np.pi / 4096) and f0.rescale_intercept == pytest.approx(-np.pi)
        phase = rescaled
    # same polarity, within half a quantisation step (pi / 4096 = 7.7e-4 rad); a flip would miss
    err = np.abs(_wrapped(phase - study.phase_rad))
    assert err.max() < 1e-3

    _, mag = _volume(mag_frames, study)
    slope = mag_frames[0].rescale_slope
    assert np.abs(mag - study.magnitude).max() <= slope / 2 + 1e-3


def test_ge_real_imaginary_give_the_phase(study, written):
    real_path, imag_path = written["ge"]
    real = frames_from_enhanced(pydicom.dcmread(real_path))
    imag = frames_from_enhanced(pydicom.dcmread(imag_path))
    assert {f.component for f in real} == {"R"} and {f.component for f in imag} == {"I"}
    assert real[0].rescale_slope == imag[0].rescale_slope
    _, re = _volume(real, study)
    _, im = _volume(imag, study)
    assert np.abs(_wrapped(np.arctan2(im, re) - study.phase_rad)).max() < 1e-3
    np.testing.assert_allclose(np.hypot(re, im), study.magnitude, rtol=1e-3)


def test_header_is_enhanced_mr_and_deterministic(study, written, tmp_path):
    ds = pydicom.dcmread(written["siemens"][1])
    assert ds.SOPClassUID == ENHANCED_MR_IMAGE_STORAGE
    assert ds.file_meta.MediaStorageSOPClassUID == ENHANCED_MR_IMAGE_STORAGE
    assert int(ds.NumberOfFrames) == len(TES_S) * SHAPE[2]
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "P", "NONE"]
    assert ds.ComplexImageComponent == "PHASE"
    again = write_enhanced_study(study, tmp_path, "siemens")
    assert pydicom.dcmread(again[1]).SOPInstanceUID == ds.SOPInstanceUID
    uids = {pydicom.dcmread(p).SOPInstanceUID for paths in written.values() for p in paths}
    series = {pydicom.dcmread(p).SeriesInstanceUID for paths in written.values() for p in paths}
    assert len(uids) == 6 and len(series) == 6


def test_common_attributes_replace_defaults(study, tmp_path):
    common = pydicom.Dataset()
    common.PatientName = "DOE^JANE"
    common.PatientID = "P123"
    common.StudyInstanceUID = "1.2.3.4"
    common.FrameOfReferenceUID = "1.2.3.5"
    common.SOPInstanceUID = "9.9.9"  # per-instance: must not be copied
    common.ManufacturerModelName = ""  # empty would break a type 1 attribute: kept
    common.BodyPartExamined = "BRAIN"
    before = copy.deepcopy(common)
    paths = write_enhanced_study(study, tmp_path, "philips", common=common)
    assert common == before  # the caller's dataset is not modified
    for p in paths:
        ds = pydicom.dcmread(p)
        assert ds.BodyPartExamined == "BRAIN"
        assert (str(ds.PatientName), ds.PatientID) == ("DOE^JANE", "P123")
        assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID) == ("1.2.3.4", "1.2.3.5")
        assert ds.SOPInstanceUID != "9.9.9"
        assert ds.ManufacturerModelName == "Ingenia Elition X"


def test_header_only_dataset_reads_pixels_from_file(written):
    path = written["siemens"][0]
    header = pydicom.dcmread(path, stop_before_pixels=True)
    frames = frames_from_enhanced(header)
    full = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(frames[5].pixels(), full[5])


def test_groups_may_sit_in_shared_or_per_frame(written):
    ds = pydicom.dcmread(written["siemens"][1])
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    for item in ds.PerFrameFunctionalGroupsSequence:
        item.PlaneOrientationSequence = orientation
    # per-frame rescale overrides the shared one
    pvt = pydicom.Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -2048, "US"
    ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = [pvt]
    frames = frames_from_enhanced(ds)
    assert frames[2].rescale_intercept == -2048.0 and frames[3].rescale_intercept == -4096.0
    np.testing.assert_allclose(frames[7].orientation, [float(v) for v in orientation[0].ImageOrientationPatient])


def test_malformed_instances_raise_dicom_input_error(written):
    ds = pydicom.dcmread(written["philips"][1])
    del ds.PerFrameFunctionalGroupsSequence[4].PlanePositionSequence
    with pytest.raises(DicomInputError, match="frame 5: no PlanePositionSequence"):
        frames_from_enhanced(ds)

    ds = pydicom.dcmread(written["philips"][1])
    ds.NumberOfFrames = 30
    with pytest.raises(DicomInputError, match="PerFrameFunctionalGroupsSequence is 24 items for 30"):
        frames_from_enhanced(ds)

    ds = pydicom.dcmread(written["philips"][1])
    del ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    with pytest.raises(DicomInputError, match="no PixelMeasuresSequence"):
        frames_from_enhanced(ds)

    ds = pydicom.dcmread(written["philips"][1])
    del ds.PixelData
    ds.filename = None
    frames = frames_from_enhanced(ds)  # header facts still usable, pixels are not
    with pytest.raises(DicomInputError, match="no PixelData"):
        frames[0].pixels()


def test_unknown_vendor_is_refused(study, tmp_path):
    with pytest.raises(ValueError, match="unknown vendor"):
        write_enhanced_study(study, tmp_path, "toshiba")


@pytest.mark.dicom_tools
def test_dciodvfy_reports_no_errors(written):
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed: cannot validate the Enhanced MR IOD")
    for paths in written.values():
        for path in paths:
            run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
            lines = (run.stdout + run.stderr).splitlines()
            assert any("EnhancedMRImage" in line for line in lines), lines[:5]  # IOD recognised
            errors = [line for line in lines if "Error" in line]
            assert errors == [], f"{path.name}: {errors}"


def test_highdicom_reads_the_same_volume(study, tmp_path):
    """An independent reader (highdicom) places every voxel where the simulator put it."""
    hd = pytest.importorskip("highdicom")
    one_echo = SimulatedStudy(
        subject_id="enh002", seed=6, geometry=study.geometry, acquisition=Acquisition([TES_S[1]]),
        magnitude=study.magnitude[1:2], phase_rad=study.phase_rad[1:2], chi_ppm=study.chi_ppm,
        brain_mask=study.brain_mask,
    )
    phase_path = write_enhanced_study(one_echo, tmp_path, "siemens")[1]
    vol = hd.imread(str(phase_path)).get_volume(apply_modality_transform=True)
    idx = np.indices(vol.array.shape).reshape(3, -1).T.astype(np.float64)
    lps = idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]
    ijk = study.geometry.patient_to_voxel(lps)
    np.testing.assert_allclose(ijk, np.rint(ijk), atol=1e-4)  # voxel centres land on our grid
    i, j, k = np.rint(ijk).astype(int).T
    theirs = vol.array.reshape(-1) * np.pi / 4096.0
    assert np.abs(_wrapped(theirs - study.phase_rad[1][i, j, k])).max() < 1e-3
    assert len(set(zip(i, j, k))) == study.geometry.n_voxels


def test_legacy_converted_enhanced_mr_keeps_echo_attributes(study):
    """Legacy Converted Enhanced MR keeps EchoTime / EchoNumbers in the unassigned groups."""
    hd = pytest.importorskip("highdicom")
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    geom = study.geometry
    uids = [generate_uid(entropy_srcs=["legacy", name]) for name in ("study", "series", "for")]
    classic = []
    for e, te_s in enumerate(TES_S[:2]):
        for k in range(3):
            ds = pydicom.Dataset()
            ds.file_meta = pydicom.dataset.FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["legacy", str(e), str(k)])
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids
            ds.Modality, ds.PatientName, ds.PatientID = "MR", "LEGACY^TEST", "L1"
            ds.PatientBirthDate, ds.PatientSex, ds.AccessionNumber = "", "O", ""
            ds.ReferringPhysicianName, ds.StudyID = "", "1"
            ds.StudyDate, ds.StudyTime, ds.ContentDate, ds.ContentTime = "20250101", "120000", "20250101", "120000"
            ds.SeriesNumber, ds.InstanceNumber, ds.AcquisitionNumber = 4, e * 3 + k + 1, 1
            ds.Manufacturer, ds.ImageType = "SIEMENS", ["ORIGINAL", "PRIMARY", "P", "ND"]
            ds.EchoTime, ds.EchoNumbers, ds.MagneticFieldStrength = te_s * 1e3, e + 1, 3
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "GR", "SP", "3D"
            ds.ImagePositionPatient = [float(v) for v in geom.slice_position(k)]
            ds.ImageOrientationPatient = geom.image_orientation()
            ds.PixelSpacing, ds.SliceThickness = geom.pixel_spacing(), 2.0
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 2, -4096, "US"
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows, ds.Columns = SHAPE[1], SHAPE[0]
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.PixelData = np.full((SHAPE[1], SHAPE[0]), 100 * e + k, np.uint16).tobytes()
            classic.append(ds)
    legacy = hd.legacy.LegacyConvertedEnhancedMRImage(
        classic, series_instance_uid=generate_uid(entropy_srcs=["legacy", "out"]), series_number=4,
        sop_instance_uid=generate_uid(entropy_srcs=["legacy", "sop"]), instance_number=1,
    )
    frames = frames_from_enhanced(legacy)
    assert len(frames) == 6
    for f in frames:
        e, k = divmod(int(f.pixels()[0, 0]), 100)  # the classic instance it came from
        assert f.echo_number == e + 1
        assert f.echo_time_ms == pytest.approx(TES_S[e] * 1e3)
        np.testing.assert_allclose(f.position, geom.slice_position(k), atol=1e-6)
        assert (f.component, f.rescale_slope, f.rescale_intercept) == ("P", 2.0, -4096.0)
        assert f.field_strength_t == 3.0 and f.acquisition_key == "1"


def test_component_falls_back_to_frame_type_value_3(written):
    ds = pydicom.dcmread(written["siemens"][1])
    del ds.SharedFunctionalGroupsSequence[0].MRImageFrameTypeSequence[0].ComplexImageComponent
    ds.ComplexImageComponent = "MIXED"
    assert {f.component for f in frames_from_enhanced(ds)} == {"P"}  # FrameType ORIGINAL\PRIMARY\P
    del ds.SharedFunctionalGroupsSequence[0].MRImageFrameTypeSequence
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER", "NONE"]
    assert {f.component for f in frames_from_enhanced(ds)} == {None}  # nothing says: unknown
