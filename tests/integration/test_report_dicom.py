"""SR, SEG and key images of one simulated study: valid DICOM, right geometry, readable back.

One coarse (4 mm) simulated subject with four microbleeds (lobar, deep, infratentorial, lobar) and
one calcification, written as classic MR and as Enhanced MR; findings are built at the truth
lesions (:func:`core.report.demo.findings_from_truth`). Checked: dciodvfy reports no error for
SEG, SR and SC; DCMTK dsrdump renders the SR; highdicom reads the SR back with every microbleed's
centre and MARS region; every SEG frame holds the label map at its own plane position; UIDs are
stable; a negative study gets an SR saying 0 and no SEG.
"""

from __future__ import annotations

import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from core.dicom.reader import load_gre
from core.findings import StudyFindings
from core.report import codes
from core.report.demo import findings_from_truth
from core.report.keyimages import BAND_PX, PANEL_PX, QSM_WINDOW_PPM, write_key_images
from core.report.seg import segment_numbers, write_seg
from core.report.sr import write_sr
from tests.conftest import dciodvfy_errors, require_tool
from training.sim.dicom_writer import write_study
from training.sim.phantom import simulate_subject

VERSION = "0.1.0"

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
        d = root / f"out_{name}"
        seg = write_seg(findings, gre, d, VERSION)
        sr = write_sr(findings, gre, d, VERSION, seg_path=seg)
        keys = write_key_images(findings, gre, study.chi_ppm, d, VERSION)
        out[name] = dict(gre=gre, findings=findings, seg=seg, sr=sr, keys=keys)
    return out


def test_fixture_has_microbleeds_and_a_mimic(case):
    f = case["classic"]["findings"]
    assert len(f.microbleeds) == 4 and [m.kind for m in f.mimics] == ["calcification"]
    assert {m.mars_category for m in f.microbleeds} == {"lobar", "deep", "infratentorial"}


@pytest.mark.parametrize("name", ["classic", "enhanced"])
def test_dciodvfy_no_errors(case, name):
    c = case[name]
    for path in [c["seg"], c["sr"], *c["keys"]]:
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
    fixed = report.get_planar_roi_measurement_groups()
    assert fixed == []
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
    # summary group: total and per region
    summary = [g for g in report.get_image_measurement_groups() if g.tracking_identifier == codes.TRACKING_SUMMARY]
    assert len(summary) == 1
    ms = summary[0].get_measurements()
    total = [x for x in ms if x.name.value == codes.NUMBER_OF_LESIONS.value and not x.finding_sites]
    assert [x.value for x in total] == [4]
    per_region = {(x.finding_sites[0].value.value, x.finding_sites[0].laterality.value): x.value
                  for x in ms if x.finding_sites}
    expected = {}
    for f in findings.microbleeds:
        key = (codes.REGION_CODES[f.mars_region].value, codes.LATERALITY[f.side].value)
        expected[key] = expected.get(key, 0) + 1
    assert per_region == expected
    # the private scheme is declared
    ds = pydicom.dcmread(c["sr"])
    assert ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CMBQSM"


def test_dsrdump_renders_the_sr(case):
    exe = require_tool("dsrdump")
    run = subprocess.run([exe, str(case["classic"]["sr"])], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "Comprehensive 3D SR" in run.stdout
    for n in (1, 2, 3, 4):
        assert f'"Microbleed {n}"' in run.stdout
    assert '"Mimic 5 (calcification)"' in run.stdout
    assert "(83251001,SCT,\"Frontal lobe\")" in run.stdout


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
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path).content
    assert report.get_volumetric_roi_measurement_groups() == []
    (summary,) = report.get_image_measurement_groups()
    counts = {x.name.meaning: x.value for x in summary.get_measurements()}
    assert counts["Number of lesions (observable entity)"] == 0
    assert counts["Number of lobar microbleeds"] == 0


def test_write_reports_writes_everything(case, tmp_path):
    from core.report import write_reports

    c = case["enhanced"]
    out = write_reports(c["findings"], c["gre"], case["study"].chi_ppm, tmp_path, VERSION)
    assert [p.name for p in out["seg"]] == ["SEG_CMB.dcm"]
    assert [p.name for p in out["sr"]] == ["SR_CMB.dcm"]
    assert [p.name for p in out["key_images"]] == [f"KEY_{n:03d}.dcm" for n in range(1, 6)]
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
