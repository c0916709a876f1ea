"""Inputs the loader must refuse, each with a one-line DicomInputError naming the problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from core.dicom.reader import load_gre, select_gre
from core.errors import DicomInputError
from tests.unit.test_dicom_roundtrip import make_study
from training.sim.dicom_writer import write_study


def _headers(paths):
    return [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in paths]


def _edit(paths, fn):
    for p in paths:
        ds = pydicom.dcmread(p)
        fn(ds)
        ds.save_as(p)


def _refusal(folder: Path, match: str) -> str:
    with pytest.raises(DicomInputError, match=match) as info:
        load_gre(folder)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_empty_and_non_dicom_folders(tmp_path):
    _refusal(tmp_path, "no DICOM files")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 300)
    msg = _refusal(tmp_path, "no DICOM files")
    assert "2 file(s)" in msg
    with pytest.raises(DicomInputError, match="does not exist"):
        load_gre(tmp_path / "nope")
    with pytest.raises(DicomInputError, match="no MR images"):
        select_gre([])


def test_dicom_but_no_mr_images(tmp_path):
    paths = write_study(make_study(1), tmp_path, "siemens")
    _edit(paths, lambda ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.7"))  # secondary capture
    _refusal(tmp_path, "no MR images")


@pytest.mark.parametrize("vendor", ["siemens", "philips"])
def test_magnitude_only(tmp_path, vendor):
    paths = write_study(make_study(2), tmp_path, vendor)
    for p, ds in _headers(paths):
        if "P" in ds.ImageType[2:]:
            p.unlink()
    msg = _refusal(tmp_path, "no phase series")
    assert "magnitude" in msg


def test_phase_only(tmp_path):
    paths = write_study(make_study(2), tmp_path, "siemens")
    for p, ds in _headers(paths):
        if "M" in ds.ImageType[2:]:
            p.unlink()
    _refusal(tmp_path, "no matching magnitude")


def test_ge_real_without_imaginary(tmp_path):
    paths = write_study(make_study(1), tmp_path, "ge")
    for p, ds in _headers(paths):
        if ds.get_private_item(0x0043, 0x2F, "GEMS_PARM_01").value == 3:
            p.unlink()
    _refusal(tmp_path, "no phase series")


@pytest.mark.parametrize(
    "vendor,kind,echo_ms,slice_k,match",
    [
        ("siemens", "M", 4.0, 5, "missing slice: echoes of magnitude"),  # one echo short
        ("philips", "P", 10.0, 0, "missing slice: echoes of phase"),
        ("ge", "I", 16.0, 11, "missing slice"),
    ],
)
def test_missing_slice_in_one_echo(tmp_path, vendor, kind, echo_ms, slice_k, match):
    study = make_study(3)
    paths = write_study(study, tmp_path, vendor)
    target = study.geometry.slice_position(slice_k)
    hit = []
    for p, ds in _headers(paths):
        comp = "M" if "M" in ds.ImageType[2:] else "P" if "P" in ds.ImageType[2:] else None
        if vendor == "ge":
            comp = {2: "R", 3: "I"}[ds.get_private_item(0x0043, 0x2F, "GEMS_PARM_01").value]
        if comp == kind and float(ds.EchoTime) == echo_ms and np.allclose(
            np.array(ds.ImagePositionPatient, float), target, atol=1e-4
        ):
            hit.append(p)
    assert len(hit) == 1
    hit[0].unlink()
    _refusal(tmp_path, match)


def test_missing_middle_slice_single_echo_is_a_gap(tmp_path):
    study = make_study(1)
    paths = write_study(study, tmp_path, "siemens")
    target = study.geometry.slice_position(6)
    for p, ds in _headers(paths):
        if np.allclose(np.array(ds.ImagePositionPatient, float), target, atol=1e-4):
            p.unlink()  # both magnitude and phase of slice 6: counts agree, the gap remains
    msg = _refusal(tmp_path, "missing slice")
    assert "gap of 3 mm" in msg and "1 slice(s) missing" in msg


def test_missing_end_slice_of_phase_single_echo(tmp_path):
    study = make_study(1)
    paths = write_study(study, tmp_path, "siemens")
    target = study.geometry.slice_position(11)
    for p, ds in _headers(paths):
        if "P" in ds.ImageType[2:] and np.allclose(np.array(ds.ImagePositionPatient, float), target, atol=1e-4):
            p.unlink()
    msg = _refusal(tmp_path, "missing slice")
    assert "12 slices per echo" in msg and "has 11" in msg


def _mix(tmp_path, study_a, study_b, vendor="siemens"):
    """Magnitude files from study A and phase files from study B (same subject and seed -> same UIDs)."""
    a = write_study(study_a, tmp_path / "a", vendor)
    b = write_study(study_b, tmp_path / "b", vendor)
    dest = tmp_path / "in"
    dest.mkdir()
    for p, ds in _headers(a):
        if "M" in ds.ImageType[2:]:
            shutil.copy(p, dest / f"m_{p.parent.name}_{p.name}")
    for p, ds in _headers(b):
        if "P" in ds.ImageType[2:]:
            shutil.copy(p, dest / f"p_{p.parent.name}_{p.name}")
    return dest


def test_magnitude_phase_shape_mismatch(tmp_path):
    dest = _mix(tmp_path, make_study(2), make_study(2, shape=(32, 26, 12)))
    msg = _refusal(tmp_path / "in", "image size differs")
    assert "28x32" in msg and "26x32" in msg


def test_magnitude_phase_position_mismatch(tmp_path):
    _mix(tmp_path, make_study(2), make_study(2, centre_lps=(2.0, -10.0, 28.0)))
    _refusal(tmp_path / "in", "slice positions differ by up to 3 mm")


def test_magnitude_phase_orientation_mismatch(tmp_path):
    _mix(tmp_path, make_study(2), make_study(2, tilt_deg=20.0), vendor="siemens")
    _refusal(tmp_path / "in", "differ in orientation")


def test_magnitude_phase_frame_of_reference_mismatch(tmp_path):
    paths = write_study(make_study(1), tmp_path, "siemens")
    _edit([p for p, ds in _headers(paths) if "P" in ds.ImageType[2:]],
          lambda ds: setattr(ds, "FrameOfReferenceUID", "1.2.3.4.5"))
    _refusal(tmp_path, "different frames of reference")


def test_echo_count_mismatch(tmp_path):
    paths = write_study(make_study(3), tmp_path, "siemens")
    for p, ds in _headers(paths):
        if "P" in ds.ImageType[2:] and float(ds.EchoTime) == 16.0:
            p.unlink()
    msg = _refusal(tmp_path, "echo count differs")
    assert "has 3 echoes" in msg and "has 2" in msg


def test_echo_times_mismatch(tmp_path):
    paths = write_study(make_study(2), tmp_path, "philips")
    def shift(ds):
        if "P" in ds.ImageType[2:]:
            ds.EchoTime = float(ds.EchoTime) + 0.5
    _edit(paths, shift)
    _refusal(tmp_path, "echo times differ")


def test_unknown_phase_scaling(tmp_path):
    paths = write_study(make_study(1), tmp_path, "philips", philips_phase_units="mrad")
    def bad(ds):
        if "P" in ds.ImageType[2:]:
            ds.RescaleSlope = 4  # rescaled -8192..8188: beyond +-1000 pi (mrad) and 0..2000 pi
            ds.RescaleIntercept = -8192
    _edit(paths, bad)
    msg = _refusal(tmp_path, "unknown phase scaling")
    assert "neither radians nor milliradians" in msg


def test_rescale_type_contradicted_by_values(tmp_path):
    paths = write_study(make_study(1), tmp_path, "philips", philips_phase_units="mrad")
    def label(ds):
        if "P" in ds.ImageType[2:]:
            ds.RescaleType = "rad"
    _edit(paths, label)
    _refusal(tmp_path, "RescaleType says radians")


@pytest.mark.parametrize("vendor", ["siemens", "philips"])
def test_gantry_tilt_or_sheared_stack(tmp_path, vendor):
    study = make_study(1)
    paths = write_study(study, tmp_path, vendor)
    g = study.geometry
    row = g.direction[:, 0]
    def shear(ds):
        pos = np.array(ds.ImagePositionPatient, float)
        k = round(float(np.dot(pos - g.origin, g.direction[:, 2])) / g.spacing[2])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos + 0.4 * k * row]
    _edit(paths, shear)
    _refusal(tmp_path, "gantry tilt or sheared")


def test_uneven_spacing(tmp_path):
    study = make_study(1)
    paths = write_study(study, tmp_path, "siemens")
    g = study.geometry
    n = g.direction[:, 2]
    def stretch(ds):
        pos = np.array(ds.ImagePositionPatient, float)
        k = round(float(np.dot(pos - g.origin, n)) / g.spacing[2])
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos + 0.1 * max(k - 6, 0) * n]  # 1.6 mm after slice 7
    _edit(paths, stretch)
    _refusal(tmp_path, "uneven slice spacing")


def test_repeated_echo_time_is_refused(tmp_path):
    """GE research sequences may repeat the first TE for every echo: the field cannot be computed."""
    paths = write_study(make_study(2), tmp_path, "ge")
    _edit(paths, lambda ds: setattr(ds, "EchoTime", "4"))
    _refusal(tmp_path, "same EchoTime")


def test_missing_echo_time_is_refused(tmp_path):
    paths = write_study(make_study(1), tmp_path, "siemens")
    _edit(paths, lambda ds: delattr(ds, "EchoTime"))
    _refusal(tmp_path, "EchoTime missing")


def test_missing_field_strength_is_refused(tmp_path):
    paths = write_study(make_study(1), tmp_path, "siemens")
    def strip(ds):
        del ds.MagneticFieldStrength
        del ds.ImagingFrequency
    _edit(paths, strip)
    _refusal(tmp_path, "field strength is needed")


def test_two_studies_are_refused(tmp_path):
    write_study(make_study(1, subject_id="a"), tmp_path / "a", "siemens")
    write_study(make_study(1, subject_id="b"), tmp_path / "b", "siemens")
    _refusal(tmp_path, "from 2 studies")


@pytest.mark.parametrize("enhanced", [False, True])
@pytest.mark.parametrize("cut, match", [
    ("header", r"truncated or corrupt DICOM file .* bytes"),
    ("pixels", r"truncated pixel data .*of \d+ bytes"),
])
def test_truncated_file_gets_its_own_error(tmp_path, enhanced, cut, match):
    """A file cut short (a copy interrupted, a full disk) is named as truncated, not reported as a
    missing slice or an undecodable image."""
    paths = sorted(write_study(make_study(2), tmp_path, "siemens", enhanced=enhanced))
    victim = paths[min(5, len(paths) - 1)]
    size = victim.stat().st_size
    with open(victim, "r+b") as fh:
        fh.truncate(400 if cut == "header" else size - 300)
    with pytest.raises(DicomInputError, match=match) as err:
        load_gre(tmp_path)
    assert "missing slice" not in str(err.value)
