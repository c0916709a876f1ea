"""Simulator -> DICOM (three vendors) -> loader: phase, magnitude, geometry and echo times survive."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.dicom.reader import load_gre, scan_folder, select_gre, frames_from_dataset, load_datasets
from core.errors import DicomInputError
from core.geometry import Geometry
from training.sim.dicom_writer import common_attributes, deterministic_uid, write_study
from training.sim.study import Acquisition, SimulatedStudy

SHAPE = (32, 28, 12)
TES = (0.004, 0.010, 0.016)


def make_study(
    n_echoes: int = 3,
    *,
    shape: tuple[int, int, int] = SHAPE,
    seed: int = 3,
    tilt_deg: float = 14.0,
    centre_lps: tuple[float, float, float] = (2.0, -10.0, 25.0),
    spacing_mm: tuple[float, float, float] = (0.9, 1.0, 1.5),
    subject_id: str = "sub-001",
) -> SimulatedStudy:
    """A small synthetic study on an oblique grid: magnitude 0.5..1, phase uniform in [-pi, pi)."""
    g = Geometry.oblique(shape, spacing_mm, tilt_deg=tilt_deg, centre_lps=centre_lps)
    rng = np.random.default_rng(seed)
    mag = rng.uniform(0.5, 1.0, (n_echoes,) + tuple(shape)).astype(np.float32)
    phase = rng.uniform(-np.pi, np.pi, (n_echoes,) + tuple(shape)).astype(np.float32)
    return SimulatedStudy(
        subject_id=subject_id,
        seed=seed,
        geometry=g,
        acquisition=Acquisition(list(TES[:n_echoes]) if n_echoes <= 3 else [0.004 + 0.006 * e for e in range(n_echoes)]),
        magnitude=mag,
        phase_rad=phase,
        chi_ppm=np.zeros(shape, np.float32),
        brain_mask=np.ones(shape, bool),
    )


def wrapped_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * (np.asarray(a, np.float64) - np.asarray(b, np.float64))))


VENDOR_CASES = [
    ("siemens", {}, "pi/4096", 0.5 / 4095),
    ("philips", {"philips_phase_units": "rad"}, "radians", 0.5 / 4095),
    ("philips", {"philips_phase_units": "mrad"}, "milliradians", 0.5 / 4095),
    ("ge", {}, "atan2", 1.0 / 32000),
]


@pytest.mark.parametrize("vendor,kwargs,scaling_word,mag_quantum", VENDOR_CASES, ids=["siemens", "philips-rad", "philips-mrad", "ge"])
def test_round_trip_per_vendor(tmp_path, vendor, kwargs, scaling_word, mag_quantum):
    study = make_study()
    paths = write_study(study, tmp_path, vendor, **kwargs)
    assert len(paths) == 2 * 3 * SHAPE[2]  # two kinds x echoes x slices
    vol = load_gre(tmp_path)

    assert vol.magnitude.shape == (3,) + SHAPE and vol.phase_rad.shape == (3,) + SHAPE
    assert vol.magnitude.dtype == np.float32 and vol.phase_rad.dtype == np.float32
    # phase within 1e-3 rad (12-bit quantisation is pi/2048 per step -> 7.7e-4 at most)
    err = np.abs(wrapped_diff(vol.phase_rad, study.phase_rad))
    assert err.max() < 1e-3, err.max()
    assert vol.phase_rad.min() >= -np.pi and vol.phase_rad.max() < np.pi
    # magnitude within quantisation, after removing the arbitrary vendor scale
    m = vol.magnitude / vol.magnitude.max()
    t = study.magnitude / study.magnitude.max()
    assert np.abs(m - t).max() <= mag_quantum + 1e-6
    # geometry, echo times, field
    np.testing.assert_allclose(vol.geometry.affine, study.geometry.affine, atol=1e-6)
    assert vol.geometry.shape == SHAPE
    np.testing.assert_allclose(vol.echo_times_s, TES, atol=1e-9)
    assert vol.field_strength_t == pytest.approx(3.0)
    assert scaling_word in vol.phase_scaling
    assert vol.phase_flipped is False
    common = common_attributes(study, vendor)
    assert vol.geometry.frame_of_reference_uid == common.FrameOfReferenceUID
    assert vol.study_instance_uid == common.StudyInstanceUID
    assert vol.patient["PatientID"] == "sub-001"
    assert vol.patient["PatientName"] == "SIM^sub-001"
    # source datasets: first echo, one per slice, sorted along the normal
    assert len(vol.source_datasets) == SHAPE[2]
    normal = study.geometry.direction[:, 2]
    locs = [float(np.dot(np.array(ds.ImagePositionPatient, float), normal)) for ds in vol.source_datasets]
    assert np.all(np.diff(locs) > 0)
    assert {float(ds.EchoTime) for ds in vol.source_datasets} == {4.0}


def test_philips_mrad_has_no_rescale_type_and_is_found_by_range(tmp_path):
    write_study(make_study(1), tmp_path, "philips", philips_phase_units="mrad")
    dss = load_datasets(tmp_path)
    phase = [ds for ds in dss if "P" in ds.ImageType[2:]]
    assert len(phase) == SHAPE[2]
    assert all("RescaleType" not in ds for ds in phase)
    rescaled = [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in phase]
    assert max(np.abs(r).max() for r in rescaled) > 3000  # really milliradians on disk
    vol = load_gre(tmp_path)
    assert "range" in vol.phase_scaling and "milliradians" in vol.phase_scaling


def test_siemens_stored_values_follow_the_vendor_convention(tmp_path):
    study = make_study(1)
    write_study(study, tmp_path, "siemens")
    dss = load_datasets(tmp_path)
    phase = [ds for ds in dss if list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "P", "ND"]]
    mag = [ds for ds in dss if list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]]
    assert len(phase) == len(mag) == SHAPE[2]
    assert {ds.SeriesInstanceUID for ds in phase}.isdisjoint({ds.SeriesInstanceUID for ds in mag})
    assert {ds.FrameOfReferenceUID for ds in dss} == {common_attributes(study, "siemens").FrameOfReferenceUID}
    ds = phase[0]
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (2.0, -4096.0)
    k = int(round(float(np.dot(np.array(ds.ImagePositionPatient, float) - study.geometry.origin, study.geometry.direction[:, 2]) / 1.5)))
    stored = ds.pixel_array.astype(np.float64)
    assert stored.min() >= 0 and stored.max() <= 4095
    radians = (stored * 2 - 4096) * np.pi / 4096
    assert np.abs(wrapped_diff(radians.T, study.phase_rad[0, :, :, k])).max() < 1e-3
    assert max(int(d.pixel_array.max()) for d in mag) == 4095  # 12-bit range used


def test_ge_private_image_type_tag(tmp_path):
    write_study(make_study(1), tmp_path, "ge")
    dss = load_datasets(tmp_path)
    codes = [ds.get_private_item(0x0043, 0x2F, "GEMS_PARM_01").value for ds in dss]
    assert sorted(set(codes)) == [2, 3] and codes.count(2) == codes.count(3) == SHAPE[2]
    assert all(list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "OTHER"] for ds in dss)
    assert all(ds.PixelRepresentation == 1 for ds in dss)
    assert len({ds.SeriesInstanceUID for ds in dss}) == 1


def test_same_seed_same_files_other_seed_other_uids(tmp_path):
    a = write_study(make_study(1), tmp_path / "a", "siemens")
    b = write_study(make_study(1), tmp_path / "b", "siemens")
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(pa.read_bytes() == pb.read_bytes() for pa, pb in zip(a, b))
    other = make_study(1, seed=4)
    assert deterministic_uid(other, "study") != deterministic_uid(make_study(1), "study")
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in a]
    assert len(set(uids)) == len(uids)


def test_omitted_echo_numbers_shuffled_nested_files_and_junk(tmp_path):
    study = make_study(3)
    src = tmp_path / "written"
    paths = write_study(study, src, "siemens", omit_echo_numbers=True)
    assert all("EchoNumbers" not in pydicom.dcmread(p) for p in paths)
    dest = tmp_path / "incoming"
    order = list(paths)
    random.Random(1).shuffle(order)
    for n, p in enumerate(order):
        sub = dest / f"d{n % 3}" / f"e{n % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, sub / f"{n * 7919 % 1000:03d}_{n}")  # names say nothing about content
    (dest / "README.txt").write_text("not dicom")
    (dest / "d1" / "notes.json").write_text("{}")
    scan = scan_folder(dest)
    assert scan.n_skipped == 2 and len(scan.datasets) == len(paths)
    vol = load_gre(dest)
    assert np.abs(wrapped_diff(vol.phase_rad, study.phase_rad)).max() < 1e-3
    np.testing.assert_allclose(vol.echo_times_s, TES)
    np.testing.assert_allclose(vol.geometry.affine, study.geometry.affine, atol=1e-6)
    assert any("EchoNumbers missing" in n for n in vol.notes)
    assert any("2 non-DICOM" in n for n in vol.notes)


def test_echoes_ordered_by_echo_time_not_echo_numbers(tmp_path):
    study = make_study(3)
    for p in write_study(study, tmp_path, "philips"):
        ds = pydicom.dcmread(p)
        ds.EchoNumbers = 4 - int(ds.EchoNumbers)  # numbering reversed relative to TE
        ds.save_as(p)
    vol = load_gre(tmp_path)
    np.testing.assert_allclose(vol.echo_times_s, TES)
    assert np.abs(wrapped_diff(vol.phase_rad, study.phase_rad)).max() < 1e-3
    assert any("not in EchoTime order" in n for n in vol.notes)


@pytest.mark.parametrize("vendor", ["siemens", "ge"])
def test_phase_flip_negates(tmp_path, vendor):
    study = make_study(2)
    write_study(study, tmp_path, vendor)
    vol = load_gre(tmp_path, phase_flip=True)
    assert vol.phase_flipped is True
    assert np.abs(wrapped_diff(vol.phase_rad, -study.phase_rad)).max() < 1e-3
    assert vol.phase_rad.min() >= -np.pi and vol.phase_rad.max() < np.pi


def test_single_echo_axial_and_patient_override(tmp_path):
    study = make_study(1, tilt_deg=0.0, shape=(20, 24, 6))
    write_study(study, tmp_path, "siemens", patient={"PatientID": "MRN123", "PatientName": "DOE^JANE"})
    vol = load_gre(tmp_path)
    assert vol.n_echoes == 1 and vol.magnitude.shape == (1, 20, 24, 6)
    np.testing.assert_allclose(vol.geometry.affine, study.geometry.affine, atol=1e-6)
    assert vol.patient["PatientID"] == "MRN123" and vol.patient["PatientName"] == "DOE^JANE"
    with pytest.raises(ValueError):
        common_attributes(study, "siemens", {"NotAKeyword": 1})


def test_pixel_array_is_transposed_slice(tmp_path):
    """pixel_array[row, col] of slice k equals the simulator's [i, j, k] transposed (j = row)."""
    study = make_study(1)
    write_study(study, tmp_path, "philips")
    ds = next(d for d in load_datasets(tmp_path) if "M" in d.ImageType[3:] and int(d.InstanceNumber) == 1)
    assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[0])
    np.testing.assert_allclose(np.array(ds.ImagePositionPatient, float), study.geometry.slice_position(0), atol=1e-6)
    mag = ds.pixel_array * float(ds.RescaleSlope)
    np.testing.assert_allclose(mag, study.magnitude[0, :, :, 0].T, atol=float(ds.RescaleSlope) / 2 + 1e-9)


def test_two_acquisitions_pick_the_larger_and_say_so(tmp_path):
    """A study with a 1-echo and a 3-echo acquisition (same frame of reference): the 3-echo one wins."""
    big = make_study(3)
    write_study(big, tmp_path / "a", "philips")
    small = make_study(1)
    for p in write_study(small, tmp_path / "b", "philips"):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 601
        ds.save_as(p)
    vol = load_gre(tmp_path)
    assert vol.n_echoes == 3
    assert any("not chosen" in n for n in vol.notes)


def test_frames_dispatch_enhanced_and_ignore_other_classes(monkeypatch):
    import sys
    import types

    seen = []
    fake = types.ModuleType("core.dicom.enhanced")
    fake.frames_from_enhanced = lambda ds: seen.append(ds) or ["frame"]
    monkeypatch.setitem(sys.modules, "core.dicom.enhanced", fake)
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"
    assert frames_from_dataset(ds) == ["frame"] and seen == [ds]
    sr = pydicom.Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    assert frames_from_dataset(sr) == []


def test_select_gre_on_frames_equals_load_gre(tmp_path):
    study = make_study(2)
    write_study(study, tmp_path, "ge")
    frames = [f for ds in load_datasets(tmp_path) for f in frames_from_dataset(ds)]
    assert len(frames) == 2 * 2 * SHAPE[2]
    assert {f.component for f in frames} == {"R", "I"}
    vol = select_gre(frames[::-1])
    ref = load_gre(tmp_path)
    np.testing.assert_array_equal(vol.phase_rad, ref.phase_rad)
    np.testing.assert_array_equal(vol.magnitude, ref.magnitude)


def test_enhanced_flag_hands_over_to_the_enhanced_writer(tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("training.sim.enhanced_writer")
    fake.write_enhanced_study = lambda study, out_dir, vendor, common: calls.append((study, out_dir, vendor, common)) or [out_dir / "x.dcm"]
    monkeypatch.setitem(sys.modules, "training.sim.enhanced_writer", fake)
    study = make_study(1)
    out = write_study(study, tmp_path, "philips", patient={"PatientID": "P9"}, enhanced=True)
    assert out == [tmp_path / "x.dcm"]
    (s, d, v, common), = calls
    assert s is study and d == tmp_path and v == "philips"
    assert common.PatientID == "P9" and common.Manufacturer == "Philips Medical Systems"
    assert common.FrameOfReferenceUID == common_attributes(study, "philips").FrameOfReferenceUID
    assert list(tmp_path.rglob("*.dcm")) == []  # nothing classic written


def test_echo_numbers_on_some_images_only(tmp_path):
    study = make_study(2)
    paths = write_study(study, tmp_path, "siemens")
    for p in paths[: len(paths) // 3]:
        ds = pydicom.dcmread(p)
        del ds.EchoNumbers
        ds.save_as(p)
    vol = load_gre(tmp_path)
    np.testing.assert_allclose(vol.echo_times_s, TES[:2])
    assert np.abs(wrapped_diff(vol.phase_rad, study.phase_rad)).max() < 1e-3
    assert any("EchoNumbers missing" in n for n in vol.notes)


@pytest.mark.parametrize("position, b0_lps, axis", [
    ("HFS", (0.0, 0.0, 1.0), None),
    ("FFS", (0.0, 0.0, -1.0), "head-foot"),
    ("HFDL", (0.0, 0.0, 1.0), "head-foot"),
    ("LFS", (1.0, 0.0, 0.0), "left-right"),
    ("AFDR", (0.0, -1.0, 0.0), "anterior-posterior"),
    ("XYZ", (0.0, 0.0, 1.0), "not a DICOM defined term"),
])
def test_patient_position_sets_the_b0_direction(tmp_path, position, b0_lps, axis):
    study = make_study(2)
    for p in write_study(study, tmp_path, "siemens"):
        ds = pydicom.dcmread(p)
        ds.PatientPosition = position
        ds.save_as(p)
    vol = load_gre(tmp_path)
    assert vol.geometry.b0_direction_lps == b0_lps
    assert (axis is None) == (not any("PatientPosition" in n for n in vol.notes))
    if axis:
        assert any(axis in n for n in vol.notes)
    # head first and feet first give the same dipole kernel direction up to sign
    if position in ("HFS", "FFS", "HFDL"):
        b = vol.geometry.b0_direction_ijk()
        ref = study.geometry.b0_direction_ijk()
        np.testing.assert_allclose(np.abs(b @ ref), 1.0, atol=1e-6)


def _drop_phase_of_echo(paths, echo_time_ms):
    """Delete the phase images of one echo (what a Siemens gre_field_mapping series lacks)."""
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        if "P" in ds.ImageType and abs(float(ds.EchoTime) - echo_time_ms) < 1e-3:
            Path(p).unlink()


def test_siemens_phase_difference_field_map_is_read_as_one_echo_of_delta_te(tmp_path):
    """Siemens gre_field_mapping: magnitude at TE1 and TE2, one phase image per slice at TE2 holding
    phi(TE2) - phi(TE1) (dcm_qa_fmap series 2+3 and 5+4 have this form)."""
    study = make_study(2)
    paths = write_study(study, tmp_path, "siemens")  # phase of echo 2 stands for the difference
    _drop_phase_of_echo(paths, TES[0] * 1e3)
    vol = load_gre(tmp_path)
    np.testing.assert_allclose(vol.echo_times_s, [TES[1] - TES[0]])
    assert vol.magnitude.shape == (1,) + SHAPE
    assert np.corrcoef(vol.magnitude[0].ravel(), study.magnitude[0].ravel())[0, 1] > 0.999  # echo 1's
    assert np.abs(wrapped_diff(vol.phase_rad[0], study.phase_rad[1])).max() < 1e-3
    assert any("phase-difference field map" in n for n in vol.notes)


def test_full_gre_is_preferred_to_a_phase_difference_map_in_the_same_study(tmp_path):
    study = make_study(3)
    write_study(study, tmp_path / "gre", "siemens")
    fmap = make_study(2, seed=8)
    paths = write_study(fmap, tmp_path / "fmap", "siemens", patient=None)
    _drop_phase_of_echo(paths, TES[0] * 1e3)
    gre_study = pydicom.dcmread(next((tmp_path / "gre").rglob("*.dcm")), stop_before_pixels=True)
    for p in (p for p in paths if Path(p).exists()):  # another series of the GRE's study
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = gre_study.StudyInstanceUID
        ds.FrameOfReferenceUID = gre_study.FrameOfReferenceUID
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".9"
        ds.SeriesNumber = int(ds.SeriesNumber) + 100
        ds.save_as(p)
    vol = load_gre(tmp_path)
    np.testing.assert_allclose(vol.echo_times_s, TES)


@pytest.mark.parametrize("vendor", ["ge", "philips"])
def test_direct_field_map_in_hz_is_refused_naming_what_it_is(tmp_path, vendor):
    study = make_study(1)
    for p in write_study(study, tmp_path, vendor):
        ds = pydicom.dcmread(p)
        if frames_from_dataset(ds)[0].component not in ("M", "R"):  # our GE writes real/imaginary
            Path(p).unlink()  # one component remains, marked below as the field map's series
            continue
        if vendor == "ge":
            block = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
            block.add_new(0x9C, "LO", "B0map")
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "T1", "FIELD_MAP"]
        ds.save_as(p)
    with pytest.raises(DicomInputError, match="field map") as err:
        load_gre(tmp_path)
    assert "Hz" in str(err.value) and "not accepted as a QSM source" in str(err.value)
