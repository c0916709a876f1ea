"""Key images for the radiologist: one Secondary Capture per finding, QSM and GRE side by side.

For each microbleed (and, labelled as such, each mimic) :func:`write_key_images` writes one
Secondary Capture Image Storage instance (highdicom ``SCImage``, MONOCHROME2, 8 bit) into the
source study:

* the acquisition-plane slice through the finding's centre (slice ``k = round(centre_voxel[2])``;
  axial for an axial acquisition), cropped to :data:`CROP_MM` x :data:`CROP_MM` around the centre
  (outside the grid: black), upsampled by pixel replication to :data:`PANEL_PX` pixels, QSM on the
  left (window :data:`QSM_WINDOW_PPM`) and first-echo GRE magnitude on the right (0 to the slice's
  99th percentile), each with a ring around the finding;
* a text band burned in with Pillow: the number, kind (microbleed / mimic), MARS region, side,
  diameter, certainty and probability; BurnedInAnnotation ``YES``;
* orientation: rows follow the grid's j axis and columns its i axis, as the source images;
  PatientOrientation gives their patient directions;
* UIDs from :mod:`core.uids` (kind ``"SC CMB key images"``, instance index = finding index), so a
  re-sent result replaces, never duplicates.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sequence import Sequence as DicomSequence

from core.dicom.volume import GREVolume
from core.findings import Finding, StudyFindings
from core.mars import REGION_BY_KEY
from core.report.seg import MANUFACTURER
from core.uids import result_instance_uid, result_series_uid

SC_KIND = "SC CMB key images"
SERIES_NUMBER = 903
CROP_MM = 64.0
PANEL_PX = 256
BAND_PX = 56
QSM_WINDOW_PPM = (-0.3, 0.5)
_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x ; +y, -y ; +z, -z (LPS)


def key_image_series_uid(gre: GREVolume, algorithm_version: str) -> str:
    return result_series_uid(gre.study_instance_uid, gre.magnitude_series_uid, SC_KIND, algorithm_version)


def _orientation_letter(v: np.ndarray) -> str:
    """Patient direction letters of a unit vector, most significant first (PS3.3 C.7.6.1.1.1)."""
    out = ""
    for axis in np.argsort(-np.abs(v)):
        if abs(v[axis]) > 0.25:
            out += _LETTERS[axis][0] if v[axis] > 0 else _LETTERS[axis][1]
    return out


def _crop(plane: np.ndarray, ci: float, cj: float, half: tuple[int, int]) -> np.ndarray:
    """``plane[i, j]`` cropped to ``2*half+1`` voxels around (ci, cj), zero outside; returned [j, i]."""
    hi, hj = half
    i0, j0 = int(round(ci)) - hi, int(round(cj)) - hj
    out = np.zeros((2 * hi + 1, 2 * hj + 1), dtype=np.float64)
    si = slice(max(i0, 0), min(i0 + 2 * hi + 1, plane.shape[0]))
    sj = slice(max(j0, 0), min(j0 + 2 * hj + 1, plane.shape[1]))
    out[si.start - i0:si.stop - i0, sj.start - j0:sj.stop - j0] = plane[si, sj]
    return out.T


def _to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((a - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def describe(f: Finding) -> str:
    """The caption burned into the key image."""
    region = REGION_BY_KEY[f.mars_region].display_name if f.mars_region in REGION_BY_KEY else "unlocated"
    what = "Microbleed" if f.kind == "cmb" else f"MIMIC ({'calcification' if f.kind == 'calcification' else 'iron'})"
    return (f"#{f.index} {what}: {region}{', ' + f.side if f.side else ''}; "
            f"{f.diameter_mm:.1f} mm; {f.certainty} (p={f.probability:.2f})")


def render(f: Finding, gre: GREVolume, chi_ppm: np.ndarray) -> np.ndarray:
    """The key image of one finding as a uint8 ``[rows, columns]`` array."""
    g = gre.geometry
    sp = np.asarray(g.spacing)
    ci, cj, ck = (float(v) for v in f.centre_voxel)
    k = int(np.clip(round(ck), 0, g.shape[2] - 1))
    half = (int(round(CROP_MM / 2 / sp[0])), int(round(CROP_MM / 2 / sp[1])))
    qsm = _crop(np.asarray(chi_ppm)[:, :, k], ci, cj, half)
    mag_plane = np.asarray(gre.magnitude[0][:, :, k], dtype=np.float64)
    mag = _crop(mag_plane, ci, cj, half)
    top = float(np.percentile(mag_plane, 99)) or 1.0
    panels = []
    for arr, lo, hi in ((qsm, *QSM_WINDOW_PPM), (mag, 0.0, top)):
        img = Image.fromarray(_to_uint8(arr, lo, hi)).resize((PANEL_PX, PANEL_PX), Image.NEAREST)
        d = ImageDraw.Draw(img)
        # ring: centre of the crop (+ sub-voxel offset), radius = focus radius + 3 mm
        px_per_mm = PANEL_PX / (2 * half[0] + 1) / sp[0], PANEL_PX / (2 * half[1] + 1) / sp[1]
        x = (half[0] + 0.5 + (ci - round(ci))) * PANEL_PX / (2 * half[0] + 1)
        y = (half[1] + 0.5 + (cj - round(cj))) * PANEL_PX / (2 * half[1] + 1)
        r = f.diameter_mm / 2 + 3.0
        d.ellipse([x - r * px_per_mm[0], y - r * px_per_mm[1], x + r * px_per_mm[0], y + r * px_per_mm[1]],
                  outline=255, width=2)
        panels.append(img)
    canvas = Image.new("L", (2 * PANEL_PX, PANEL_PX + BAND_PX), 0)
    canvas.paste(panels[0], (0, BAND_PX))
    canvas.paste(panels[1], (PANEL_PX, BAND_PX))
    d = ImageDraw.Draw(canvas)
    d.text((6, 4), describe(f), fill=255, font=_font(15))
    d.text((6, 26), f"QSM {QSM_WINDOW_PPM[0]:+.1f}..{QSM_WINDOW_PPM[1]:+.1f} ppm   slice {k + 1}",
           fill=200, font=_font(13))
    d.text((PANEL_PX + 6, 26), f"GRE magnitude TE1   {CROP_MM:.0f} mm field", fill=200, font=_font(13))
    return np.asarray(canvas, dtype=np.uint8)


def _source_reference(gre: GREVolume, k: int) -> pydicom.Dataset | None:
    if not gre.source_datasets:
        return None
    ds = gre.source_datasets[0] if len(gre.source_datasets) == 1 else gre.source_datasets[k]
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return item


def build_key_image(f: Finding, gre: GREVolume, chi_ppm: np.ndarray, algorithm_version: str) -> hd.sc.SCImage:
    """The SC dataset of one finding."""
    series_uid = key_image_series_uid(gre, algorithm_version)
    p = gre.patient
    d = gre.geometry.direction
    sc = hd.sc.SCImage(
        pixel_array=render(f, gre, chi_ppm),
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=gre.study_instance_uid,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=result_instance_uid(series_uid, f.index),
        instance_number=f.index,
        manufacturer=MANUFACTURER,
        patient_id=p.get("PatientID"),
        patient_name=p.get("PatientName"),
        patient_birth_date=p.get("PatientBirthDate"),
        patient_sex=p.get("PatientSex") or None,
        accession_number=p.get("AccessionNumber"),
        study_id=p.get("StudyID"),
        study_date=p.get("StudyDate"),
        study_time=p.get("StudyTime"),
        referring_physician_name=p.get("ReferringPhysicianName"),
        patient_orientation=(_orientation_letter(d[:, 0]), _orientation_letter(d[:, 1])),
        series_description=f"CMB key images (CMB-QSM {algorithm_version})",
        software_versions=str(algorithm_version),
    )
    sc.BurnedInAnnotation = "YES"
    # The brain is not a paired body part: Laterality (type 2C) absent, which dciodvfy accepts once
    # BodyPartExamined says so.
    src = gre.source_datasets[0] if gre.source_datasets else None
    sc.BodyPartExamined = str(src.get("BodyPartExamined", "") or "BRAIN") if src is not None else "BRAIN"
    sc.ImageComments = describe(f)
    sc.DerivationDescription = "QSM and first-echo GRE magnitude, cropped around the finding, text burned in"
    ref = _source_reference(gre, int(np.clip(round(f.centre_voxel[2]), 0, gre.geometry.shape[2] - 1)))
    if ref is not None:
        sc.SourceImageSequence = DicomSequence([ref])
    return sc


def write_key_images(findings: StudyFindings, gre: GREVolume, chi_ppm: np.ndarray, out_dir: Path,
                     algorithm_version: str) -> list[Path]:
    """Write one key image per finding as ``out_dir/KEY_<index:03d>.dcm``; return the paths.

    Args:
        findings: the study's findings (none: nothing written, empty list).
        gre: source acquisition (geometry, first-echo magnitude, study, patient).
        chi_ppm: QSM map ``[i, j, k]`` in ppm on ``gre.geometry``'s grid.
        out_dir: created if needed.
        algorithm_version: the product's version (SoftwareVersions, UIDs).
    """
    if tuple(np.shape(chi_ppm)) != tuple(gre.geometry.shape):
        raise ValueError(f"QSM map {np.shape(chi_ppm)} is not on the GRE grid {gre.geometry.shape}")
    out_dir = Path(out_dir)
    paths = []
    for f in sorted(findings.findings, key=lambda f: (f.kind != "cmb", f.index)):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"KEY_{f.index:03d}.dcm"
        build_key_image(f, gre, chi_ppm, algorithm_version).save_as(path)
        paths.append(path)
    return paths
