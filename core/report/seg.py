"""The microbleed segmentation as a binary DICOM SEG referencing the source magnitude series.

:func:`write_seg` turns ``StudyFindings.label_map`` (``[i, j, k]`` on the GRE grid, value =
``Finding.mask_label``) into one binary DICOM Segmentation instance (highdicom):

* segment 1: cerebral microbleeds (all ``kind == "cmb"`` foci), then, only when present,
  calcifications and iron deposits as separate segments, labelled as mimics;
* property category / type: SCT 49755003 "Morphologically Abnormal Structure" / SCT 50960005
  "Hemorrhage" for microbleeds (both PS3.16 CID 7150 / 7151); see :mod:`core.report.codes`;
* source images: the first-echo magnitude images (``gre.source_datasets``) or, for an Enhanced MR
  source, the multi-frame instance. highdicom requires ``pixel_array[n]`` to be the segmentation
  of source frame ``n``; highdicom does not sort. Each source frame's slice index ``k`` is computed
  from its ImagePositionPatient through the GRE geometry (not assumed from list order), and frame
  ``n`` is ``label_map[:, :, k].T`` (rows = j, columns = i);
* stable UIDs from :mod:`core.uids` (kind ``"SEG CMB"``): the same study and algorithm version
  always give the same Series / SOP Instance UIDs.

No findings with voxels (no label map, or nothing labelled) means no SEG: :func:`write_seg`
returns ``None`` and the SR then carries points only.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

from core.dicom.volume import GREVolume
from core.errors import DicomInputError
from core.findings import KINDS, StudyFindings
from core.report import codes
from core.uids import derived_uid, result_instance_uid, result_series_uid

MANUFACTURER = "CMB-QSM open source"
MODEL_NAME = "CMB-QSM node"
SEG_KIND = "SEG CMB"
SERIES_NUMBER = 901


def seg_uids(gre: GREVolume, algorithm_version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SEG for this acquisition and version."""
    series = result_series_uid(gre.study_instance_uid, gre.magnitude_series_uid, SEG_KIND, algorithm_version)
    return series, result_instance_uid(series, 0)


def segment_numbers(findings: StudyFindings) -> dict[str, int]:
    """kind -> segment number for the kinds that have labelled voxels (microbleeds first)."""
    present = {f.kind for f in findings.findings if f.mask_label}
    return {kind: n for n, kind in enumerate((k for k in KINDS if k in present), start=1)}


def _is_enhanced(gre: GREVolume) -> bool:
    return bool(gre.source_datasets) and "PerFrameFunctionalGroupsSequence" in gre.source_datasets[0]


def _frame_slices(gre: GREVolume) -> list[int]:
    """Slice index k of every SEG frame, in the order highdicom will walk them.

    Classic source: one frame per source image, k from its ImagePositionPatient. Enhanced MR
    source: the instance holds every echo (positions repeat), so the SEG frames are given their
    own plane positions, one per slice in k order (:func:`build_seg`), and highdicom links them to
    the source instance.
    """
    if _is_enhanced(gre):
        return list(range(gre.geometry.shape[2]))
    inv = np.linalg.inv(gre.geometry.affine)
    ks: list[int] = []
    for ds in gre.source_datasets:
        for pos in [ds.ImagePositionPatient]:
            ijk = inv @ np.array([float(v) for v in pos] + [1.0])
            k = int(round(ijk[2]))
            if abs(ijk[2] - k) > 0.05 or not 0 <= k < gre.geometry.shape[2]:
                raise DicomInputError(f"source frame at {list(pos)} is not on the acquisition grid")
            ks.append(k)
    return ks


def segment_array(findings: StudyFindings, gre: GREVolume) -> np.ndarray:
    """Frames x rows x columns uint8 array of segment numbers, in source-frame order."""
    lm = np.asarray(findings.label_map)
    findings.check_label_map(gre.geometry.shape)
    numbers = segment_numbers(findings)
    lut = np.zeros(int(lm.max()) + 1, dtype=np.uint8)
    for f in findings.findings:
        if f.mask_label:
            lut[f.mask_label] = numbers[f.kind]
    seg_ijk = lut[lm.astype(np.int64)]
    return np.stack([seg_ijk[:, :, k].T for k in _frame_slices(gre)]).astype(np.uint8)


#: RecommendedDisplayCIELabValue of each segment, given as sRGB: microbleeds red, calcifications
#: cyan, iron deposits orange (without one OHIF warns on import and picks its own default colour).
SEGMENT_RGB = {"cmb": (255, 0, 0), "calcification": (0, 200, 255), "iron": (255, 160, 0)}


def _descriptions(findings: StudyFindings, algorithm_version: str) -> list[hd.seg.SegmentDescription]:
    algo = hd.AlgorithmIdentificationSequence(
        name="CMB-QSM", family=codes.codes.cid7162.ArtificialIntelligence, version=algorithm_version)
    out = []
    for kind, n in segment_numbers(findings).items():
        category = codes.CATEGORY_SUBSTANCE if kind == "iron" else codes.CATEGORY_ABNORMAL
        prop = {"cmb": codes.SEG_TYPE_CMB, "calcification": codes.SEG_TYPE_CALCIFICATION,
                "iron": codes.SEG_TYPE_IRON}[kind]
        out.append(hd.seg.SegmentDescription(
            segment_number=n,
            segment_label=codes.SEG_LABELS[kind],
            segmented_property_category=category,
            segmented_property_type=prop,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=_tracking_uid(findings, kind),
            tracking_id=codes.SEG_LABELS[kind],
            anatomic_regions=[codes.codes.SCT.Brain],
            display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_RGB[kind]),
        ))
    return out


def _tracking_uid(findings: StudyFindings, kind: str) -> str:
    """Stable TrackingUID of a segment (same study, version and kind -> same UID)."""
    return derived_uid("segment", findings.study_instance_uid, findings.algorithm_version, kind)


def build_seg(findings: StudyFindings, gre: GREVolume, algorithm_version: str) -> hd.seg.Segmentation | None:
    """The SEG dataset, or ``None`` when no finding has voxels in the label map."""
    if findings.label_map is None or not any(f.mask_label for f in findings.findings):
        return None
    if not gre.source_datasets:
        raise DicomInputError("no source magnitude images to reference: cannot write the SEG")
    series_uid, sop_uid = seg_uids(gre, algorithm_version)
    pixels = segment_array(findings, gre)
    spatial = {}
    if _is_enhanced(gre):
        if len(gre.source_datasets) != 1:
            raise DicomInputError("Enhanced MR source split over several instances: the SEG needs one")
        g = gre.geometry
        spatial = dict(
            plane_positions=[hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT,
                                                      [float(v) for v in g.slice_position(k)])
                             for k in range(g.shape[2])],
            plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT,
                                                          [float(v) for v in g.image_orientation()]),
            pixel_measures=hd.PixelMeasuresSequence([float(v) for v in g.pixel_spacing()],
                                                    float(g.spacing[2])),
        )
    seg = hd.seg.Segmentation(
        source_images=list(gre.source_datasets),
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_descriptions(findings, algorithm_version),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=str(algorithm_version),
        device_serial_number="0",
        series_description=f"CMB segmentation (CMB-QSM {algorithm_version})",
        content_label="CMB",
        content_description="Cerebral microbleeds and mimics on QSM",
        omit_empty_frames=True,
        **spatial,
    )
    _declare_private_scheme(seg, findings)
    drop_empty_copied_sequences(seg)
    return seg


def _declare_private_scheme(seg: hd.seg.Segmentation, findings: StudyFindings) -> None:
    if "calcification" in segment_numbers(findings):
        seg.CodingSchemeIdentificationSequence = pydicom.Sequence([codes.private_scheme_item()])


def write_seg(findings: StudyFindings, gre: GREVolume, out_dir: Path, algorithm_version: str) -> Path | None:
    """Write the SEG as ``out_dir/SEG_CMB.dcm``; ``None`` (nothing written) when there is nothing to segment.

    Args:
        findings: the study's findings with ``label_map`` on ``gre.geometry``'s grid.
        gre: the source acquisition (geometry, first-echo magnitude datasets, study).
        out_dir: created if needed.
        algorithm_version: goes into SoftwareVersions, the algorithm identification and the UIDs.
    """
    seg = build_seg(findings, gre, algorithm_version)
    return None if seg is None else save_in(seg, out_dir, "SEG_CMB.dcm")


def save_in(ds, out_dir: Path, name: str) -> Path:
    """Write ``ds`` as ``out_dir/name`` (the folder created if needed) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    ds.save_as(path)
    return path


#: Type 3 sequences of the Patient and General Study modules that highdicom copies from the first
#: evidence instance: a scanner may send them with no item (a real Philips Achieva classic MR has
#: an empty ProcedureCodeSequence), which is invalid once copied (Type 3 sequences hold 1-n items)
COPIED_TYPE3_SEQUENCES = (
    "ProcedureCodeSequence", "ReferencedStudySequence", "PhysiciansOfRecordIdentificationSequence",
    "PhysiciansReadingStudyIdentificationSequence", "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianIdentificationSequence", "RequestingServiceCodeSequence",
    "ReasonForPerformedProcedureCodeSequence", "OtherPatientIDsSequence",
    "IssuerOfPatientIDQualifiersSequence", "ReferencedPatientSequence", "ReferencedPatientPhotoSequence",
    "AdmittingDiagnosesCodeSequence",
)


def drop_empty_copied_sequences(ds) -> None:
    """Remove the :data:`COPIED_TYPE3_SEQUENCES` that are present with zero items."""
    for kw in COPIED_TYPE3_SEQUENCES:
        if kw in ds and ds[kw].VR == "SQ" and len(ds[kw].value) == 0:
            del ds[kw]
