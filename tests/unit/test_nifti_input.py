"""NIfTI research input on small synthetic arrays: kind detection, file classification, reorientation
back to the DICOM layout, Siemens phase scaling, placeholder patient/UIDs, and the one-line refusals."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pydicom
import pytest

from core.errors import NiftiInputError
from core.geometry import Geometry
from core.input_kind import (DICOM_GRE, NIFTI_GRE, QSM_DICOM, QSM_NIFTI, InputKindError, detect_input_kind,
                             dicom_input_kind)
from core.nifti_input import classify, load_nifti_gre, load_nifti_qsm, synthesise_source_series
from tests.nifti_writer import write_dcm2niix_like

TE = (0.005, 0.010, 0.015)


def _gre(shape=(12, 10, 8), tilt=0.0):
    rng = np.random.default_rng(0)
    g = Geometry.oblique(shape, (1.0, 1.5, 2.0), tilt_deg=tilt, centre_lps=(3.0, -7.0, 11.0),
                         frame_of_reference_uid="1.2.3")
    mag = rng.integers(0, 4095, size=(len(TE), *shape)).astype(np.float32)
    # Siemens: rescaled = 2 * stored - 4096, even numbers in -4096..4094
    phase = (2 * rng.integers(-2048, 2048, size=(len(TE), *shape)) * np.pi / 4096).astype(np.float32)
    return g, mag, phase


def _one_line(exc) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("tilt", [0.0, 17.0])
def test_dcm2niix_layout_is_read_back_to_the_dicom_layout(tmp_path, tilt):
    g, mag, phase = _gre(tilt=tilt)
    write_dcm2niix_like(tmp_path, mag, phase, TE, g, field_strength_t=1.5)
    gre = load_nifti_gre(tmp_path)
    np.testing.assert_allclose(gre.geometry.affine, g.affine, atol=1e-4)  # float32 header precision
    np.testing.assert_array_equal(gre.magnitude, mag)
    np.testing.assert_allclose(gre.phase_rad, phase, atol=1e-6)
    np.testing.assert_allclose(gre.echo_times_s, TE)
    assert gre.field_strength_t == 1.5 and gre.manufacturer == "Siemens" and gre.input_kind == "nifti-gre"
    assert "siemens" in gre.phase_scaling
    # placeholders, marked; UIDs name-based: the same files give the same UIDs
    assert gre.patient["PatientName"] == f"NIFTI^{gre.patient['PatientID']}"
    assert any("placeholders" in n for n in gre.notes)
    assert load_nifti_gre(tmp_path).study_instance_uid == gre.study_instance_uid
    assert len({gre.study_instance_uid, gre.magnitude_series_uid, gre.phase_series_uid}) == 3


def test_bids_names_without_image_type(tmp_path):
    g, mag, phase = _gre()
    write_dcm2niix_like(tmp_path / "sub-07" / "anat", mag, phase, TE, g, bids=True, subject="07")
    gre = load_nifti_gre(tmp_path)
    assert gre.patient["PatientID"] == "07"
    np.testing.assert_array_equal(gre.magnitude, mag)
    np.testing.assert_allclose(gre.phase_rad, phase, atol=1e-6)


def test_classify_prefers_image_type_over_names(tmp_path):
    p = tmp_path / "x_e1_ph.nii.gz"
    assert classify(p, {"ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"]}) == "M"  # sidecar first
    assert classify(p, None) == "P"
    assert classify(tmp_path / "x_e1.nii.gz", {"ImageType": ["ORIGINAL", "PRIMARY", "P", "ND", "PHASE"]}) == "P"
    assert classify(tmp_path / "s_e2_real.nii.gz", {}) == "R"
    assert classify(tmp_path / "s_e2_imaginary.nii.gz", {}) == "I"
    assert classify(tmp_path / "sub-1_echo-2_part-phase_T2starw.nii.gz", {}) == "P"
    assert classify(tmp_path / "sub-1_echo-2_part-mag_T2starw.nii.gz", {}) == "M"
    assert classify(tmp_path / "sub-1_Chimap.nii.gz", {}) == "QSM"
    assert classify(tmp_path / "qsm.nii.gz", None) == "QSM"
    assert classify(tmp_path / "map.nii.gz", {"Quantity": "susceptibility"}) == "QSM"
    assert classify(tmp_path / "brain_mask.nii.gz", None) == "MASK"
    assert classify(tmp_path / "chicken.nii.gz", None) is None  # "chi" only as the last word
    assert classify(tmp_path / "QSM_GRE_3D_ME_5_e1.nii.gz", None) is None  # a protocol name, not a map
    assert classify(tmp_path / "sub-1_acq-x_chi.nii", None) == "QSM"


def test_detect_input_kind(tmp_path):
    g, mag, phase = _gre()
    gre_dir, qsm_dir, dcm_dir, other = (tmp_path / n for n in ("gre", "qsm", "dcm", "other"))
    write_dcm2niix_like(gre_dir, mag, phase, TE, g)
    assert detect_input_kind(gre_dir) == NIFTI_GRE
    write_dcm2niix_like(qsm_dir, mag, phase, TE, g, only="M")
    nib.save(nib.Nifti1Image(np.zeros(g.shape, np.float32), np.eye(4)), str(qsm_dir / "sub-01_Chimap.nii.gz"))
    assert detect_input_kind(qsm_dir) == QSM_NIFTI
    dcm_dir.mkdir()
    ds = pydicom.Dataset()
    ds.PatientID = "x"
    ds.SOPClassUID = pydicom.uid.MRImageStorage
    ds.SOPInstanceUID = "1.2.3.4"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(dcm_dir / "IM0001", enforce_file_format=True)
    assert detect_input_kind(dcm_dir) == "dicom"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    with pytest.raises(InputKindError) as exc:
        detect_input_kind(other)
    assert "no DICOM or NIfTI files" in _one_line(exc) and ".txt" in str(exc.value)


def test_dicom_input_kind_keeps_the_gre_path_when_phase_is_there():
    f = lambda comp, it=("ORIGINAL", "PRIMARY", "M"): SimpleNamespace(component=comp, image_type=it)  # noqa: E731
    qsm = f(None, ("DERIVED", "SECONDARY", "QSM"))
    assert dicom_input_kind([f("M"), f("P"), qsm]) == DICOM_GRE  # our QSM sent back with the study
    assert dicom_input_kind([f("M"), qsm]) == QSM_DICOM
    assert dicom_input_kind([f("R"), f("I"), qsm]) == DICOM_GRE
    assert dicom_input_kind([f("M")]) == DICOM_GRE  # the GRE reader's own refusal then says why


def test_refusals_are_one_line(tmp_path):
    g, mag, phase = _gre()
    only_phase = tmp_path / "p"
    write_dcm2niix_like(only_phase, mag, phase, TE, g, only="P")
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(only_phase)
    assert "phase NIfTI found but no magnitude" in _one_line(exc)

    only_mag = tmp_path / "m"
    write_dcm2niix_like(only_mag, mag, phase, TE, g, only="M")
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(only_mag)
    assert "no phase NIfTI" in _one_line(exc)

    no_te = tmp_path / "te"
    write_dcm2niix_like(no_te, mag, phase, TE, g, drop=("EchoTime",))
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(no_te)
    assert "no EchoTime" in _one_line(exc)

    no_b0 = tmp_path / "b0"
    write_dcm2niix_like(no_b0, mag, phase, TE, g, drop=("MagneticFieldStrength", "ImagingFrequency"))
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(no_b0)
    assert "field strength" in _one_line(exc)

    mixed = tmp_path / "mixed"
    write_dcm2niix_like(mixed, mag, phase, TE, g)
    g2, mag2, phase2 = _gre(shape=(12, 10, 7))
    write_dcm2niix_like(tmp_path / "mixed2", mag2, phase2, TE, g2)
    (tmp_path / "mixed2" / "QSM_GRE_3D_ME_PHA_6_e2_ph.nii.gz").replace(mixed / "QSM_GRE_3D_ME_PHA_6_e2_ph.nii.gz")
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(mixed)
    assert "image size differs" in _one_line(exc) and "12x10x7" in str(exc.value)

    no_side = tmp_path / "side"
    write_dcm2niix_like(no_side, mag, phase, TE, g)
    (no_side / "QSM_GRE_3D_ME_5_e1.json").unlink()
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(no_side)
    assert "no JSON sidecar" in _one_line(exc)

    not_phase = tmp_path / "range"
    write_dcm2niix_like(not_phase, mag, phase, TE, g)
    for p in not_phase.glob("*_ph.nii.gz"):  # a magnitude-like range, no scaling, no Siemens rule
        img = nib.load(str(p))
        bad = nib.Nifti1Image(np.asarray(img.dataobj, np.float32) * 100 + 5000, img.affine, img.header)
        bad.header.set_slope_inter(1.0, 0.0)
        nib.save(bad, str(p))
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(not_phase)
    assert "unknown phase scaling" in _one_line(exc)

    four_d = tmp_path / "4d"
    four_d.mkdir()
    img = nib.Nifti1Image(np.zeros((*g.shape, 3), np.int16), np.eye(4))
    nib.save(img, str(four_d / "gre_e1.nii.gz"))
    (four_d / "gre_e1.json").write_text(json.dumps({"EchoTime": 0.005, "ImageType": ["ORIGINAL", "PRIMARY", "M"]}))
    nib.save(img, str(four_d / "gre_e1_ph.nii.gz"))
    (four_d / "gre_e1_ph.json").write_text(json.dumps({"EchoTime": 0.005}))
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_gre(four_d)
    assert "3 volumes but its sidecar gives no EchoTime list" in _one_line(exc)


def test_four_d_file_with_echo_time_list(tmp_path):
    g, mag, phase = _gre()
    write_dcm2niix_like(tmp_path / "a", mag, phase, TE, g)
    out = tmp_path / "b"
    out.mkdir()
    for pattern, name in (("QSM_GRE_3D_ME_5_e*.nii.gz", "gre_mag"), ("*_ph.nii.gz", "gre_phase")):
        files = sorted((tmp_path / "a").glob(pattern))
        imgs = [nib.load(str(p)) for p in files]
        four = nib.Nifti1Image(np.stack([i.dataobj.get_unscaled() for i in imgs], -1), imgs[0].affine, imgs[0].header)
        nib.save(four, str(out / f"{name}.nii.gz"))
        side = json.loads(files[0].with_name(files[0].name.replace(".nii.gz", ".json")).read_text())
        side["EchoTime"] = list(TE)
        (out / f"{name}.json").write_text(json.dumps(side))
    gre = load_nifti_gre(out)
    np.testing.assert_array_equal(gre.magnitude, mag)
    np.testing.assert_allclose(gre.phase_rad, phase, atol=1e-6)


def test_precomputed_qsm_refusals(tmp_path):
    g, mag, phase = _gre()
    write_dcm2niix_like(tmp_path, mag, phase, TE, g, only="P")
    ref = nib.load(str(next(tmp_path.glob("*_e1_ph.nii.gz"))))
    nib.save(nib.Nifti1Image(np.ones(g.shape, np.float32) * 0.1, ref.affine), str(tmp_path / "qsm.nii.gz"))
    with pytest.raises(NiftiInputError) as exc:
        load_nifti_qsm(tmp_path)
    assert "needs the GRE magnitude" in _one_line(exc)
    write_dcm2niix_like(tmp_path, mag, phase, TE, g, only="M")
    nib.save(nib.Nifti1Image(np.full(g.shape, 120.0, np.float32), ref.affine), str(tmp_path / "qsm.nii.gz"))
    with pytest.raises(NiftiInputError) as exc:  # ppb, not ppm
        load_nifti_qsm(tmp_path)
    assert "not ppm" in _one_line(exc)


def test_synthesised_source_series_sits_on_the_grid(tmp_path):
    g, mag, phase = _gre(tilt=10.0)
    write_dcm2niix_like(tmp_path, mag, phase, TE, g)
    gre = load_nifti_gre(tmp_path)
    src = synthesise_source_series(gre)
    assert len(src) == g.shape[2] and gre.sources_synthesised
    for k in (0, g.shape[2] - 1):
        ds = src[k]
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], g.slice_position(k), atol=1e-4)
        assert ds.StudyInstanceUID == gre.study_instance_uid and ds.SeriesInstanceUID == gre.magnitude_series_uid
        back = np.frombuffer(ds.PixelData, "<u2").reshape(int(ds.Rows), int(ds.Columns)).T * float(ds.RescaleSlope)
        np.testing.assert_allclose(back, mag[0][:, :, k], atol=float(ds.RescaleSlope))
