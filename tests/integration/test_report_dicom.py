"""SR, SEG, key images and KOS of one simulated study: valid DICOM, right geometry, readable back.

One coarse (4 mm) simulated subject with four microbleeds (lobar, deep, infratentorial, lobar) and
one calcification, written as classic MR and as Enhanced MR; findings are built at the truth
lesions (:func:`core.report.demo.findings_from_truth`). Checked: dciodvfy reports no error for
SEG, SR, SC and KOS; DCMTK dsrdump renders the SR and the KOS; highdicom reads the SR back with
every microbleed's centre and MARS region, and with two image-referenced circles per finding, on
its QSM slice and on the right first-echo image, at the right pixel coordinates; the Image Library
lists those images; the clinical summary is the report's Qualitative Evaluations text; every group
carries the algorithm identification; dcmqi's tid1500reader reads every group; the
KOS references the key images and the SR; every SEG frame holds the label map at its own plane
position; UIDs are stable; a negative study gets an SR saying 0, no SEG and no KOS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from core.detect.detector import DetectorConfig
from core.dicom.derived import write_qsm_series
from core.dicom.reader import load_gre
from core.findings import StudyFindings
from core.report import codes
from core.report.demo import findings_from_truth
from core.report.keyimages import BAND_PX, PANEL_PX, QSM_WINDOW_PPM, write_key_images
from core.report.keyobjects import write_kos
from core.report.seg import segment_numbers, write_seg
from core.report.summary import clinical_summary, summary_text
from core.report.sr import write_sr
from tests.conftest import REPO, dciodvfy_errors, require_tool
from training.sim.dicom_writer import write_study
from training.sim.phantom import simulate_subject

VERSION = "0.1.0"
PARAMETERS = DetectorConfig.from_json(
    json.loads((REPO / "models" / "detector.json").read_text())).algorithm_parameters()

# one 4 mm simulation (about 10-20 s on 2 shared cores) feeds every test of the module
pytestmark = [pytest.mark.slow, pytest.mark.dicom_tools]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    study = simulate_subject("rep", 1, voxel_mm=(4, 4, 4), n_cmb=4,
                             cmb_categories=["lobar", "deep", "infratentorial", "lobar"], n_calc=1)
    write_study(study, root / "classic", "siemens")
    write_study(study, root / "enhanced", "siemens", enhanced=True)
    out = {"study": study, "root": root}
    for name in ("classic", "enhanced"):
        gre = load_gre(root / name)
        findings = findings_from_truth(study, gre.study_instance_uid, VERSION)
        findings.parameters = PARAMETERS  # what CMBDetector.detect attaches
        d = root / f"out_{name}"
        seg = write_seg(findings, gre, d, VERSION)
        qsm = write_qsm_series(study.chi_ppm, gre, d / "qsm", method="STAR-QSM", algorithm_version=VERSION)
        sr = write_sr(findings, gre, d, VERSION, seg_path=seg, qsm_paths=qsm)
        keys = write_key_images(findings, gre, study.chi_ppm, d, VERSION)
        kos = write_kos(findings, gre, d, VERSION, keys, sr)
        out[name] = dict(gre=gre, findings=findings, seg=seg, qsm=qsm, sr=sr, keys=keys, kos=kos)
    return out


def test_fixture_has_microbleeds_and_a_mimic(case):
    f = case["classic"]["findings"]
    assert len(f.microbleeds) == 4 and [m.kind for m in f.mimics] == ["calcification"]
    assert {m.mars_category for m in f.microbleeds} == {"lobar", "deep", "infratentorial"}


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_dciodvfy_no_errors(case, name):
    c = case[name]
    for path in [c["seg"], c["sr"], *c["keys"], c["kos"]]:
        assert dciodvfy_errors(path) == [], path.name


def _expected_frames(c):
    """SEG frame pixels expected from the label map at each frame's plane position."""
    ds = pydicom.dcmread(c["seg"])
    g = c["gre"].geometry
    inv = np.linalg.inv(g.affine)
    numbers = segment_numbers(c["findings"])
    lut = np.zeros(int(c["findings"].label_map.max()) + 1, dtype=np.uint8)
    for f in c["findings"].findings:
        lut[f.mask_label] = numbers[f.kind]
    seg_ijk = lut[c["findings"].label_map]
    return ds, inv, seg_ijk


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_seg_frames_match_label_map_at_their_positions(case, name):
    c = case[name]
    ds, inv, seg_ijk = _expected_frames(c)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Cerebral microbleeds", "Calcifications (mimic)"]
    # a display colour per segment (sRGB red / cyan through CIELab, back within 1 level)
    rgb = [hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb() for s in ds.SegmentSequence]
    assert all(max(abs(a - b) for a, b in zip(got, want)) <= 1 for got, want in zip(rgb, [(255, 0, 0), (0, 200, 255)]))
    cat = ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("50960005", "SCT")
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    seen = set()
    for n, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        seg_no = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        pos = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        ijk = inv @ np.array(pos + [1.0])
        k = int(round(ijk[2]))
        assert np.allclose(ijk[:3], [0, 0, k], atol=1e-3)
        expected = (seg_ijk[:, :, k] == seg_no).T  # [row = j, column = i]
        assert np.array_equal(pixels[n].astype(bool), expected), (n, k)
        seen.add((seg_no, k))
    # every non-empty (segment, slice) of the label map is in the SEG
    want = {(int(s), int(k)) for s in (1, 2) for k in range(seg_ijk.shape[2]) if (seg_ijk[:, :, k] == s).any()}
    assert seen == want
    # the SEG references the first-echo magnitude series
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == c["gre"].magnitude_series_uid
    src_uids = {s.SOPInstanceUID for s in c["gre"].source_datasets}
    assert {i.ReferencedSOPInstanceUID for i in ref.ReferencedInstanceSequence} <= src_uids
    if name == "enhanced":
        assert len(src_uids) == 1


def _groups_by_label(sr: hd.sr.Comprehensive3DSR):
    report = sr.content
    return {g.tracking_identifier: g for g in
            report.get_volumetric_roi_measurement_groups()}, report


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_sr_reads_back_with_each_microbleed(case, name):
    c = case[name]
    sr = hd.sr.srread(c["sr"])
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    groups, report = _groups_by_label(sr)
    planar = {g.tracking_identifier: g for g in report.get_planar_roi_measurement_groups()}
    assert set(planar) == set(groups)  # image-referenced groups of every finding (see below)
    findings = c["findings"]
    assert set(groups) == {f"Microbleed {f.index}" for f in findings.microbleeds} | {"Mimic 5 (calcification)"}
    for f in findings.findings:
        label = f"Microbleed {f.index}" if f.kind == "cmb" else f"Mimic {f.index} (calcification)"
        g = groups[label]
        assert g.finding_type.value == codes.FINDING_BY_KIND[f.kind].value
        site = g.finding_sites[0]
        assert site.value.value == codes.REGION_CODES[f.mars_region].value
        assert site.laterality.value == codes.LATERALITY[f.side].value
        centre = [it for it in g[0].ContentSequence
                  if it.ValueType == "SCOORD3D" and it.ConceptNameCodeSequence[0].CodeValue == "111010"]
        assert len(centre) == 1
        assert centre[0].ReferencedFrameOfReferenceUID == c["gre"].geometry.frame_of_reference_uid
        assert np.allclose(centre[0].GraphicData, f.centre_lps_mm, atol=1e-3)
        seg_ref = g.referenced_segment  # the segment of its kind in the SEG
        assert seg_ref.referenced_segment_numbers == [segment_numbers(findings)[f.kind]]
        assert seg_ref.referenced_sop_instance_uid == pydicom.dcmread(c["seg"]).SOPInstanceUID
        m = {x.name.meaning: x for x in g.get_measurements()}
        assert m["Diameter"].value == pytest.approx(f.diameter_mm, abs=0.006)
        assert m["Diameter"].unit.value == "mm"
        assert m["Volume"].value == pytest.approx(f.volume_mm3, abs=0.006)
        assert m["Magnetic Susceptibility"].unit.value == "[ppm]"
        assert m["Magnetic Susceptibility"].value == pytest.approx(f.mean_chi_ppm, abs=1e-4)
        assert m["Probability"].value == pytest.approx(f.probability, abs=1e-4)
        q = {x.name.meaning: x.value.meaning for x in g.get_qualitative_evaluations()}
        assert q["MARS category"] == f.mars_category.capitalize()
        assert q["Certainty of Finding"] == f.certainty.capitalize()
    # no TID 1501 group (OHIF 3.13.2 throws on a group without image coordinates); the summary is
    # the report's Qualitative Evaluations text
    assert report.get_image_measurement_groups() == []
    assert _summary_text(c["sr"]) == summary_text(clinical_summary(findings))
    assert _summary_text(c["sr"]).startswith("Cerebral microbleeds (QSM): 4 (")
    # the private scheme is declared
    ds = pydicom.dcmread(c["sr"])
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CMBQSM"


def _summary_text(path: Path) -> str:
    """The TEXT "Summary" (DCM 121111) of the report-level Qualitative Evaluations (UMLS C0034375)."""
    root = pydicom.dcmread(path).ContentSequence
    (qual,) = [it for it in root if it.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    assert qual.ConceptNameCodeSequence[0].CodingSchemeDesignator == "UMLS" and qual.ValueType == "CONTAINER"
    assert root[-1] is qual  # after the Imaging Measurements (TID 1500 row order)
    (text,) = qual.ContentSequence
    assert (text.ValueType, text.RelationshipType) == ("TEXT", "CONTAINS")
    assert (text.ConceptNameCodeSequence[0].CodeValue, text.ConceptNameCodeSequence[0].CodingSchemeDesignator) \
        == ("121111", "DCM")
    return str(text.TextValue)


def test_dsrdump_renders_the_sr(case):
    exe = require_tool("dsrdump")
    run = subprocess.run([exe, str(case["classic"]["sr"])], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Comprehensive 3D SR" in run.stdout
    for n in (1, 2, 3, 4):
        assert f'"Microbleed {n}"' in run.stdout
    assert '"Mimic 5 (calcification)"' in run.stdout
    assert "(83251001,SCT,\"Frontal lobe\")" in run.stdout
    assert '(,,"Summary")="Cerebral microbleeds (QSM):' in run.stdout  # the summary text (cut by dsrdump)


def test_uids_are_stable_and_versioned(case, tmp_path):
    c = case["classic"]
    again = write_sr(c["findings"], c["gre"], tmp_path / "a", VERSION, seg_path=c["seg"])
    a, b = pydicom.dcmread(c["sr"]), pydicom.dcmread(again)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    other_path = write_sr(c["findings"], c["gre"], tmp_path / "b", "0.2.0")  # no SEG: point ROIs
    other = pydicom.dcmread(other_path)
    assert other.SeriesInstanceUID != a.SeriesInstanceUID
    assert dciodvfy_errors(other_path) == []
    g = hd.sr.srread(other_path).content.get_volumetric_roi_measurement_groups()[0]
    assert g.referenced_segment is None
    assert g.roi.graphic_type.value == "POINT"
    assert np.allclose(g.roi.graphic_data, [c["findings"].microbleeds[0].centre_lps_mm], atol=1e-3)
    seg_again = pydicom.dcmread(write_seg(c["findings"], c["gre"], tmp_path / "c", VERSION))
    assert seg_again.SOPInstanceUID == pydicom.dcmread(c["seg"]).SOPInstanceUID
    keys = [pydicom.dcmread(p) for p in c["keys"]]
    assert len({k.SOPInstanceUID for k in keys}) == len(keys) == 5
    assert len({k.SeriesInstanceUID for k in keys}) == 1
    assert all(k.StudyInstanceUID == c["gre"].study_instance_uid for k in keys)


def test_key_image_shows_the_focus_at_its_place(case):
    c = case["classic"]
    f = c["findings"].microbleeds[0]
    ds = pydicom.dcmread(c["keys"][0])
    assert ds.BurnedInAnnotation == "YES"
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert f"#{f.index} Microbleed" in ds.ImageComments
    img = ds.pixel_array
    assert img.shape == (BAND_PX + PANEL_PX, 2 * PANEL_PX)
    assert img[:BAND_PX].max() == 255  # caption text burned in
    chi = case["study"].chi_ppm
    g = c["gre"].geometry
    ci, cj, ck = (int(round(v)) for v in f.centre_voxel)
    half = int(round(32 / g.spacing[0]))
    step = PANEL_PX / (2 * half + 1)
    lo, hi = QSM_WINDOW_PPM
    for di, dj in ((0, 0), (4, 0), (0, -4), (-3, 5)):  # off-centre voxels check the [j, i] layout
        x, y = int((half + di + 0.5) * step), int((half + dj + 0.5) * step)
        want = np.clip((chi[ci + di, cj + dj, ck] - lo) / (hi - lo) * 255, 0, 255)
        assert abs(int(img[BAND_PX + y, x]) - int(want)) <= 1, (di, dj)


def test_negative_study(case, tmp_path):
    gre = case["classic"]["gre"]
    empty = StudyFindings(gre.study_instance_uid, VERSION, [], np.zeros(gre.geometry.shape, np.uint16))
    assert write_seg(empty, gre, tmp_path, VERSION) is None
    assert not (tmp_path / "SEG_CMB.dcm").exists()
    assert write_key_images(empty, gre, case["study"].chi_ppm, tmp_path, VERSION) == []
    path = write_sr(empty, gre, tmp_path, VERSION)
    assert write_kos(empty, gre, tmp_path, VERSION, [], path) is None
    assert not (tmp_path / "KO_CMB.dcm").exists()
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path).content
    assert report.get_volumetric_roi_measurement_groups() == []
    assert report.get_planar_roi_measurement_groups() == report.get_image_measurement_groups() == []
    text = _summary_text(path)
    assert text.startswith("Cerebral microbleeds (QSM): 0 (0 definite, 0 possible)")
    assert "MARS categories: lobar 0, deep 0, infratentorial 0" in text


def test_write_reports_writes_everything(case, tmp_path):
    from core.report import write_reports

    c = case["enhanced"]
    out = write_reports(c["findings"], c["gre"], case["study"].chi_ppm, tmp_path, VERSION)
    assert [p.name for p in out["seg"]] == ["SEG_CMB.dcm"]
    assert [p.name for p in out["sr"]] == ["SR_CMB.dcm"]
    assert [p.name for p in out["key_images"]] == [f"KEY_{n:03d}.dcm" for n in range(1, 6)]
    assert [p.name for p in out["kos"]] == ["KO_CMB.dcm"]
    assert pydicom.dcmread(out["kos"][0]).SOPInstanceUID == pydicom.dcmread(c["kos"]).SOPInstanceUID
    text = (tmp_path / "cmb_summary.txt").read_text()
    assert text.startswith("Cerebral microbleeds (QSM): 4 (")
    assert "Distribution: mixed." in text  # lobar + deep (external capsule) + brainstem


def test_microbleeds_only_single_segment_seg(case, tmp_path):
    """A study with microbleeds and no mimic gives a one-segment SEG (highdicom then keeps the
    segment identification in the shared functional groups); the SR must still reference it."""
    gre = case["classic"]["gre"]
    full = case["classic"]["findings"]
    only = StudyFindings(full.study_instance_uid, VERSION, list(full.microbleeds), full.label_map.copy())
    for f in full.mimics:
        only.label_map[only.label_map == f.mask_label] = 0
    seg = write_seg(only, gre, tmp_path, VERSION)
    assert len(pydicom.dcmread(seg).SegmentSequence) == 1
    path = write_sr(only, gre, tmp_path, VERSION, seg_path=seg)
    assert dciodvfy_errors(path) == []
    groups = hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(only.microbleeds)
    assert all(g.referenced_segment is not None for g in groups)


# ---------------------------------------------------------------- image-referenced groups, KOS


def _plane_of(ds: pydicom.Dataset, frame: int | None):
    """(IPP, IOP, PixelSpacing, echo time ms) of a classic image or of one frame of an Enhanced MR
    image, read from the file's own attributes (not from our geometry)."""
    if frame is None:
        return (np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float),
                np.array(ds.PixelSpacing, float), float(ds.EchoTime))
    fg, shared = ds.PerFrameFunctionalGroupsSequence[frame - 1], ds.SharedFunctionalGroupsSequence[0]

    def grp(kw):
        return (fg if kw in fg else shared)[kw][0]
    return (np.array(grp("PlanePositionSequence").ImagePositionPatient, float),
            np.array(grp("PlaneOrientationSequence").ImageOrientationPatient, float),
            np.array(grp("PixelMeasuresSequence").PixelSpacing, float),
            float(grp("MREchoSequence").EffectiveEchoTime))


def _first_te_ms(c) -> float:
    return float(c["gre"].echo_times_s[0]) * 1e3


def _check_circle(region, f, g, ipp, iop, ps) -> None:
    """A SCOORD CIRCLE centred at (i + 0.5, j + 0.5) of the finding with its radius; mapped through
    the image's own IPP / IOP / PixelSpacing, the centre lands on the finding's LPS centre (up to
    the sub-slice offset) and the image is slice round(k)."""
    assert region.graphic_type == hd.sr.GraphicTypeValues.CIRCLE
    k = int(round(f.centre_voxel[2]))
    k_of_plane = (np.linalg.inv(g.affine) @ np.append(ipp, 1.0))[2]
    assert k_of_plane == pytest.approx(k, abs=1e-3)
    (x, y), (x2, y2) = region.value
    assert (x, y) == pytest.approx((f.centre_voxel[0] + 0.5, f.centre_voxel[1] + 0.5), abs=1e-4)
    assert (x2 - x, y2 - y) == pytest.approx((f.diameter_mm / 2 / ps[1], 0.0), abs=1e-4)
    # PS3.3 C.7.6.2.1.1: P = IPP + row_dir * col_spacing * c + col_dir * row_spacing * r, with
    # (c, r) the 0-based pixel indices = SCOORD - 0.5
    normal = g.direction[:, 2]
    p = ipp + iop[:3] * ps[1] * (x - 0.5) + iop[3:] * ps[0] * (y - 0.5)
    off = np.asarray(f.centre_lps_mm) - p
    assert np.dot(off, normal) == pytest.approx((f.centre_voxel[2] - k) * g.spacing[2], abs=1e-3)
    assert np.linalg.norm(off - np.dot(off, normal) * normal) < 1e-3


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_planar_circles_on_the_qsm_and_the_source_image_of_each_finding(case, name):
    """Each finding has two TID 1410 groups with the same tracking label and UID as its 3D group,
    first the one on its slice of the QSM series (what OHIF draws, see core.report.sr), then the
    one on the first-echo magnitude image of slice round(k) (frame of the Enhanced MR instance);
    each circle is checked against the referenced file's own plane (:func:`_check_circle`)."""
    c = case[name]
    report = hd.sr.srread(c["sr"]).content
    vol = {g.tracking_identifier: g for g in report.get_volumetric_roi_measurement_groups()}
    planar = report.get_planar_roi_measurement_groups()
    assert len(planar) == 2 * len(c["findings"].findings) == 10
    by_uid = {ds.SOPInstanceUID: ds for ds in c["gre"].source_datasets}
    qsm = {(ds := pydicom.dcmread(p, stop_before_pixels=True)).SOPInstanceUID: ds for p in c["qsm"]}
    g = c["gre"].geometry
    for n, f in enumerate(c["findings"].microbleeds + c["findings"].mimics):
        on_qsm, on_mag = planar[2 * n], planar[2 * n + 1]
        for grp in (on_qsm, on_mag):
            label = grp.tracking_identifier
            assert label == (f"Microbleed {f.index}" if f.kind == "cmb" else f"Mimic {f.index} (calcification)")
            assert label == vol[label].tracking_identifier and grp.tracking_uid == vol[label].tracking_uid
        img = on_qsm.roi.ContentSequence[0].ReferencedSOPSequence[0]
        q = qsm[img.ReferencedSOPInstanceUID]
        assert "ReferencedFrameNumber" not in img and img.ReferencedSOPClassUID == q.SOPClassUID
        assert "QSM" in q.ImageType
        _check_circle(on_qsm.roi, f, g, np.array(q.ImagePositionPatient, float),
                      np.array(q.ImageOrientationPatient, float), np.array(q.PixelSpacing, float))
        img = on_mag.roi.ContentSequence[0].ReferencedSOPSequence[0]
        uid = img.ReferencedSOPInstanceUID
        frame = int(img.ReferencedFrameNumber) if "ReferencedFrameNumber" in img else None
        assert uid in by_uid
        assert (frame is not None) == (name == "enhanced")
        ipp, iop, ps, te = _plane_of(by_uid[uid], frame)
        assert te == pytest.approx(_first_te_ms(c))  # first echo
        assert img.ReferencedSOPClassUID == by_uid[uid].SOPClassUID
        _check_circle(on_mag.roi, f, g, ipp, iop, ps)


def test_sr_without_a_qsm_series_keeps_the_source_circle(case, tmp_path):
    """Without a QSM series (a precomputed NIfTI map) each finding keeps its circle on the source."""
    c = case["classic"]
    path = write_sr(c["findings"], c["gre"], tmp_path, VERSION, seg_path=c["seg"])
    assert dciodvfy_errors(path) == []
    planar = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    src = {ds.SOPInstanceUID for ds in c["gre"].source_datasets}
    assert len(planar) == 5
    assert all(p.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in src for p in planar)


def test_qsm_series_off_the_grid_is_refused(case):
    from core.report.sr import build_sr

    c = case["classic"]
    qsm = [pydicom.dcmread(p, stop_before_pixels=True) for p in c["qsm"]]
    with pytest.raises(ValueError, match="images for"):
        build_sr(c["findings"], c["gre"], VERSION, qsm_images=qsm[:-1])
    qsm[3].ImagePositionPatient = [float(v) + 1.0 for v in qsm[3].ImagePositionPatient]
    with pytest.raises(ValueError, match="QSM image 4 is not at slice 3"):
        build_sr(c["findings"], c["gre"], VERSION, qsm_images=qsm)


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_image_library_lists_the_referenced_images(case, name):
    c = case[name]
    ds = pydicom.dcmread(c["sr"])
    root = ds.ContentSequence
    (library,) = [it for it in root if it.ConceptNameCodeSequence[0].CodeValue == "111028"]
    entries = {(it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                int(it.ReferencedSOPSequence[0].get("ReferencedFrameNumber", 0) or 0) or None)
               for grp in library.ContentSequence for it in grp.ContentSequence if it.ValueType == "IMAGE"}
    refs = set()
    for grp in hd.sr.srread(c["sr"]).content.get_planar_roi_measurement_groups():
        img = grp.roi.ContentSequence[0].ReferencedSOPSequence[0]
        refs.add((img.ReferencedSOPInstanceUID, int(img.ReferencedFrameNumber) if "ReferencedFrameNumber" in img
                  else None))
    # each slice with a finding: its magnitude image and its QSM image
    assert entries == refs and len(refs) == 2 * len({int(round(f.centre_voxel[2])) for f in c["findings"].findings})


def test_algorithm_identification_in_every_group(case):
    report = hd.sr.srread(case["classic"]["sr"]).content
    groups = (report.get_planar_roi_measurement_groups() + report.get_volumetric_roi_measurement_groups()
              + report.get_image_measurement_groups())
    assert len(groups) == 15
    assert any(p.startswith("stage1_threshold=") for p in PARAMETERS)
    assert any(p.startswith("vnet_sha256=") for p in PARAMETERS)
    for g in groups:
        items = {}
        for it in g[0].ContentSequence:
            if it.ValueType == "TEXT" and it.ConceptNameCodeSequence[0].CodeValue in ("111001", "111003", "111002"):
                items.setdefault(it.ConceptNameCodeSequence[0].CodeMeaning, []).append(it.TextValue)
        assert items["Algorithm Name"] == ["CMB-QSM"]
        assert items["Algorithm Version"] == [VERSION]
        assert items["Algorithm Parameters"] == PARAMETERS


def _tid1500reader() -> str:
    exe = shutil.which("tid1500reader") or str(Path(sys.executable).parent / "tid1500reader")
    if not Path(exe).exists():
        if __import__("os").environ.get("CI"):
            pytest.fail("tid1500reader missing: pip install -r requirements-dev.txt (dcmqi)")
        pytest.skip("tid1500reader (dcmqi) is not installed")
    return exe


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_dcmqi_tid1500reader_reads_every_group(case, name, tmp_path):
    c = case[name]
    out = tmp_path / "sr.json"
    run = subprocess.run([_tid1500reader(), "--inputDICOM", str(c["sr"]), "--outputMetadata", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads(out.read_text())
    labels = [m["TrackingIdentifier"] for m in meta["Measurements"]]
    want = [f"Microbleed {f.index}" if f.kind == "cmb" else f"Mimic {f.index} (calcification)"
            for f in c["findings"].microbleeds + c["findings"].mimics]
    assert labels == [x for lab in want for x in (lab, lab, lab)]  # QSM circle, source circle, 3-D
    diam = {m["TrackingIdentifier"]: float(i["value"]) for m in meta["Measurements"]
            for i in m.get("measurementItems", []) if i["quantity"]["CodeMeaning"] == "Diameter"}
    for f in c["findings"].findings:
        lab = want[[x.index for x in c["findings"].microbleeds + c["findings"].mimics].index(f.index)]
        assert diam[lab] == pytest.approx(f.diameter_mm, abs=0.006)
    assert all(m["measurementAlgorithmIdentification"]["AlgorithmName"] == "CMB-QSM" for m in meta["Measurements"])


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_kos_references_key_images_and_sr(case, name):
    c = case[name]
    ds = pydicom.dcmread(c["kos"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert ds.StudyInstanceUID == c["gre"].study_instance_uid
    sr = pydicom.dcmread(c["sr"])
    assert ds.SeriesInstanceUID not in {sr.SeriesInstanceUID, pydicom.dcmread(c["keys"][0]).SeriesInstanceUID}
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
    refs = [it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for it in ds.ContentSequence
            if it.ValueType in ("IMAGE", "COMPOSITE")]
    want = [pydicom.dcmread(p).SOPInstanceUID for p in c["keys"]] + [sr.SOPInstanceUID]
    assert refs == want
    ev = {i.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
          for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert ev == set(want)
    assert isinstance(kos, hd.ko.KeyObjectSelectionDocument)


def test_dsrdump_renders_the_kos(case):
    exe = require_tool("dsrdump")
    run = subprocess.run([exe, str(case["classic"]["kos"])], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Key Object Selection Document" in run.stdout
    assert run.stdout.count("IMAGE:") == 5 and run.stdout.count("COMPOSITE:") == 1


def test_empty_type3_sequences_of_the_source_are_not_copied(case, tmp_path):
    """A real Philips Achieva classic MR (dcm_qa_philips_enh series 2001) carries an empty
    ProcedureCodeSequence; highdicom copied it into the SR, which dciodvfy rejects."""
    import copy
    c = case["classic"]
    gre = copy.copy(c["gre"])
    gre.source_datasets = [copy.deepcopy(ds) for ds in c["gre"].source_datasets]
    for ds in gre.source_datasets:
        ds.ProcedureCodeSequence = pydicom.Sequence([])
        ds.ReferencedStudySequence = pydicom.Sequence([])
    seg = write_seg(c["findings"], gre, tmp_path, VERSION)
    sr = write_sr(c["findings"], gre, tmp_path, VERSION, seg_path=seg)
    keys = write_key_images(c["findings"], gre, case["study"].chi_ppm, tmp_path, VERSION)
    kos = write_kos(c["findings"], gre, tmp_path, VERSION, keys, sr)
    for path in [seg, sr, *keys, kos]:
        assert dciodvfy_errors(path) == [], path.name
        assert "ProcedureCodeSequence" not in pydicom.dcmread(path, stop_before_pixels=True)
