"""The microbleed report as a Comprehensive 3D SR (TID 1500 Measurement Report), with highdicom.

What :func:`write_sr` puts in the report (DESIGN.md section 4, "SR"):

* observer context: a device observer, the product (name ``CMB-QSM``, its version), with a UID
  derived from the version;
* one TID 1411 volumetric measurement group per finding, microbleeds first, then mimics:
  tracking identifier ``Microbleed <n>`` or ``Mimic <n> (calcification|iron deposit)`` and a
  stable tracking UID; finding type (private ``99CMBQSM`` codes, declared in
  CodingSchemeIdentificationSequence: no verifiable SNOMED CT concept for "cerebral microbleed");
  finding category SCT "Morphologically Abnormal Structure"; finding site = MARS region (SNOMED CT
  where PS3.16 has the structure, else private) with laterality (SCT Left / Right, DCM Median);
  location = SCOORD3D POINT "Center" (DCM 111010) in the source frame of reference; as the group's
  ROI, a reference to the segment of the finding's kind (microbleeds, calcifications, iron
  deposits) when a SEG exists, else a POINT volume surface at the centre; measurements
  diameter (mm), volume (mm3), mean magnetic susceptibility (UCUM ``[ppm]``), detection probability
  (UCUM ``1``); qualitative evaluations MARS category and certainty (definite / possible);
* before each finding's volumetric group, TID 1410 planar groups with the same tracking
  identifier and tracking UID (one finding, several views of it), each a SCOORD CIRCLE "Image
  Region" (DCM 111030) on the image of the slice nearest the centre (``round(k)``): first on the
  QSM series the app wrote (the map the finding was detected on; when there is one), then on the
  first-echo source magnitude (for Enhanced MR the frame number); centre at pixel
  ``(i + 0.5, j + 0.5)`` (PS3.3 C.18.6.1.1: (column, row), top-left corner of the top-left pixel
  at (0, 0)), second point on the circumference at the finding's radius; finding type, category
  and site as in the 3D group. Why both and in that order: image viewers draw 2D SCOORDs on the
  referenced image; OHIF 3.x (its cornerstone-dicom-sr extension, read from its 3.13.2 build)
  merges measurement groups that share a Tracking Unique Identifier and draws only the first
  SCOORD/SCOORD3D of the merged group, and it hangs the SR viewport (minutes, measured in the
  viewer test's browser) when that image belongs to a multi-echo series holding several images
  per slice position, as every multi-echo GRE does; the QSM series has one image per position.
  The magnitude circle stays for every other reader (the source image, as IHE AI Results asks);
* an Image Library (TID 1600) listing the images those circles reference (highdicom's
  ``referenced_images``; its entries cannot describe a frame of a multi-frame image, so for
  Enhanced MR the entry is described from the frame's plane and given its frame number by hand,
  :func:`_library_images`);
* in every group, TID 4019 algorithm identification: name ``CMB-QSM``, the version, and the
  operating point (``findings.parameters``, set by the detector) as Algorithm Parameters;
* the study summary as TEXT "Summary" (DCM 121111) in TID 1500's report-level "Qualitative
  Evaluations" container (UMLS C0034375): the clinical summary's text
  (:func:`core.report.summary.summary_text`: counts, MARS categories and table, sizes, the
  distribution pattern and its caveat), what every SR viewer shows. It is not a TID 1501 group
  of counts (as before): OHIF 3.13.2 reads the first image coordinate of every measurement group
  and throws on a group without one, which left every circle of the report undrawn. The counts
  stay machine-readable as the groups themselves (one volumetric group per finding, with its
  region and category) and in findings.json / cmb_summary.json. A negative study has no
  measurement group and says "0" in the summary.

Evidence: the source first-echo magnitude images (or the Enhanced MR instance), the QSM series'
images when given, and the SEG.
UIDs from :mod:`core.uids` (kind ``"SR CMB"``).
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sequence import Sequence as DicomSequence

from core.dicom.volume import GREVolume
from core.findings import Finding, StudyFindings
from core.report import codes
from core.report.seg import MANUFACTURER, _frame_slices, drop_empty_copied_sequences, save_in, segment_numbers
from core.report.summary import clinical_summary, summary_text
from core.uids import derived_uid, result_instance_uid, result_series_uid

SR_KIND = "SR CMB"
SERIES_NUMBER = 902
DEVICE_NAME = "CMB-QSM"
MIMIC_NAMES = {"calcification": "calcification", "iron": "iron deposit"}


def sr_uids(gre: GREVolume, algorithm_version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the SR for this acquisition and version."""
    series = result_series_uid(gre.study_instance_uid, gre.magnitude_series_uid, SR_KIND, algorithm_version)
    return series, result_instance_uid(series, 0)


def tracking_label(f: Finding) -> str:
    """The tracking identifier a radiologist reads: ``Microbleed 3`` or ``Mimic 5 (calcification)``."""
    if f.kind == "cmb":
        return f"Microbleed {f.index}"
    return f"Mimic {f.index} ({MIMIC_NAMES[f.kind]})"


def _finding_site(region_key: str | None, side: str | None) -> list[hd.sr.FindingSite]:
    if not region_key:
        return []
    lat = codes.LATERALITY.get(side or "")
    return [hd.sr.FindingSite(anatomic_location=codes.REGION_CODES[region_key], laterality=lat)]


def _tracking(f: Finding, findings: StudyFindings) -> hd.sr.TrackingIdentifier:
    """Label and UID of a finding, shared by its planar and its volumetric group."""
    return hd.sr.TrackingIdentifier(
        identifier=tracking_label(f),
        uid=derived_uid("finding", findings.study_instance_uid, findings.algorithm_version, str(f.index), f.kind),
    )


def algorithm_identification(findings: StudyFindings, algorithm_version: str) -> hd.sr.AlgorithmIdentification:
    """TID 4019: name, version and, when the detector gave them (``findings.parameters``, see
    :meth:`core.detect.detector.DetectorConfig.algorithm_parameters`), the operating point."""
    params = [str(p) for p in (getattr(findings, "parameters", None) or [])]
    return hd.sr.AlgorithmIdentification(name=DEVICE_NAME, version=str(algorithm_version),
                                         parameters=params or None)


def slice_index(f: Finding, gre: GREVolume) -> int:
    """The acquisition slice nearest the finding's centre: ``round(k)``, clipped to the grid."""
    return int(np.clip(round(float(f.centre_voxel[2])), 0, gre.geometry.shape[2] - 1))


def slice_reference(gre: GREVolume, k: int) -> tuple[str, str, int | None] | None:
    """(SOPClassUID, SOPInstanceUID, frame number or None) of first-echo slice ``k``.

    From ``gre.slice_references`` (the loader's); for a hand-built volume without them, a classic
    source image whose ImagePositionPatient lies on slice ``k``. ``None`` when there is none.
    """
    if gre.slice_references:
        cls, uid, frame = gre.slice_references[k]
        return str(cls), str(uid), (None if frame is None else int(frame))
    if not gre.source_datasets or "PerFrameFunctionalGroupsSequence" in gre.source_datasets[0]:
        return None
    ks = _frame_slices(gre)
    if k not in ks:
        return None
    ds = gre.source_datasets[ks.index(k)]
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), None


def image_region(f: Finding, gre: GREVolume, ref: tuple[str, str, int | None] | None = None) -> hd.sr.ImageRegion | None:
    """SCOORD CIRCLE on the image of the finding's slice (TID 1410 "Image Region"): the source
    magnitude's (:func:`slice_reference`) unless ``ref`` (SOPClassUID, SOPInstanceUID, frame or
    None) names another image on the same grid (the QSM series' slice).

    Pixel coordinates (PS3.3 C.18.6.1.1) are (column, row) with the top-left corner of the
    top-left pixel at (0, 0), so the centre of voxel ``(i, j)`` (columns follow i, rows follow j,
    as in the source images) is ``(i + 0.5, j + 0.5)``; the fractional centre keeps its sub-voxel
    part. The circle's second point lies on the circumference at the finding's radius
    (``diameter_mm / 2``) along the row, in column pixels.
    """
    if ref is None:
        ref = slice_reference(gre, slice_index(f, gre))
    if ref is None:
        return None
    cls, uid, frame = ref
    x, y = float(f.centre_voxel[0]) + 0.5, float(f.centre_voxel[1]) + 0.5
    r_px = float(f.diameter_mm) / 2.0 / float(gre.geometry.spacing[0])
    source = hd.sr.SourceImageForRegion(cls, uid, referenced_frame_numbers=None if frame is None else [frame])
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.CIRCLE,
        graphic_data=np.array([[x, y], [x + r_px, y]], dtype=np.float64),
        source_image=source,
        pixel_origin_interpretation=None if frame is None else hd.sr.PixelOriginInterpretationValues.FRAME,
    )


def qsm_slice_images(qsm_images: Sequence[pydicom.Dataset] | None, gre: GREVolume) -> list[pydicom.Dataset] | None:
    """The QSM series' image of each slice ``k`` (``qsm_images`` as written, ordered by ``k``),
    checked to lie on the GRE grid (one image per slice, each at the slice's position within
    0.01 mm); ``None`` when no QSM series is given."""
    if not qsm_images:
        return None
    g = gre.geometry
    if len(qsm_images) != g.shape[2]:
        raise ValueError(f"QSM series has {len(qsm_images)} images for {g.shape[2]} slices")
    for k, ds in enumerate(qsm_images):
        if not np.allclose([float(v) for v in ds.ImagePositionPatient], g.slice_position(k), atol=0.01):
            raise ValueError(f"QSM image {k + 1} is not at slice {k}'s position")
    return list(qsm_images)


def _planar_group(f: Finding, gre: GREVolume, findings: StudyFindings, algo: hd.sr.AlgorithmIdentification,
                  ref: tuple[str, str, int | None] | None = None,
                  ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 group of a finding: its circle on one image (the source magnitude's unless ``ref``
    names another, see :func:`image_region`), same tracking label and UID as its volumetric group
    (so a viewer merges them into one finding), type, category, site."""
    region = image_region(f, gre, ref)
    if region is None:
        return None
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(f, findings),
        referenced_region=region,
        finding_type=codes.FINDING_BY_KIND[f.kind],
        finding_category=codes.CATEGORY_ABNORMAL,
        finding_sites=_finding_site(f.mars_region, f.side),
        algorithm_id=copy.deepcopy(algo),
    )


def _group(f: Finding, gre: GREVolume, findings: StudyFindings, seg_refs: dict[str, hd.sr.ReferencedSegment],
           algo: hd.sr.AlgorithmIdentification):
    tracking = _tracking(f, findings)
    measurements = [
        hd.sr.Measurement(name=codes.DIAMETER, value=round(float(f.diameter_mm), 2), unit=codes.UNIT_MM),
        hd.sr.Measurement(name=codes.VOLUME, value=round(float(f.volume_mm3), 2), unit=codes.UNIT_MM3),
        hd.sr.Measurement(name=codes.SUSCEPTIBILITY, value=round(float(f.mean_chi_ppm), 4), unit=codes.UNIT_PPM,
                          derivation=codes.MEAN),
        hd.sr.Measurement(name=codes.PROBABILITY, value=round(float(f.probability), 4), unit=codes.UNIT_ONE),
    ]
    evaluations = [hd.sr.QualitativeEvaluation(codes.CERTAINTY, codes.CERTAINTY_VALUES[f.certainty])]
    if f.mars_category:
        evaluations.insert(0, hd.sr.QualitativeEvaluation(codes.MARS_CATEGORY, codes.CATEGORY_VALUES[f.mars_category]))
    kw = {}
    if f.kind in seg_refs and f.mask_label:
        kw["referenced_segment"] = copy.deepcopy(seg_refs[f.kind])
    else:
        kw["referenced_volume_surface"] = _point(f, gre)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.FINDING_BY_KIND[f.kind],
        finding_category=codes.CATEGORY_ABNORMAL,
        finding_sites=_finding_site(f.mars_region, f.side),
        measurements=measurements,
        qualitative_evaluations=evaluations,
        algorithm_id=copy.deepcopy(algo),
        **kw,
    )
    _append_centre(group, f, gre)
    return group


def _point(f: Finding, gre: GREVolume) -> hd.sr.VolumeSurface:
    """The ROI of a finding without a segment: a POINT volume surface at its centre (TID 1411)."""
    return hd.sr.VolumeSurface(
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([list(f.centre_lps_mm)], dtype=np.float64),
        frame_of_reference_uid=gre.geometry.frame_of_reference_uid,
        source_series=hd.sr.SourceSeriesForSegmentation(gre.magnitude_series_uid),
    )


def _append_centre(group, f: Finding, gre: GREVolume) -> None:
    """Add the centre as SCOORD3D POINT "Center" (DCM 111010) to a measurement group.

    TID 1411 takes one ROI per group (highdicom refuses both a segment and a region, and refuses
    coordinates on measurements of a volumetric group). With a SEG the ROI is the segment, else a
    POINT volume surface; in both cases the centre is appended as one more content item of the
    group, so that every group carries its location the same way, in patient coordinates of the
    source frame of reference.
    """
    item = hd.sr.Scoord3DContentItem(
        name=codes.CENTRE,
        graphic_type=hd.sr.GraphicTypeValues3D.POINT,
        graphic_data=np.array([list(f.centre_lps_mm)], dtype=np.float64),
        frame_of_reference_uid=gre.geometry.frame_of_reference_uid,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    group[0].ContentSequence.append(item)


def _append_summary(report: hd.sr.MeasurementReport, findings: StudyFindings) -> None:
    """Add the report-level "Qualitative Evaluations" container (TID 1500) holding the clinical
    summary as TEXT "Summary", after the Imaging Measurements."""
    container = hd.sr.ContainerContentItem(name=codes.QUALITATIVE_EVALUATIONS,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([hd.sr.TextContentItem(
        name=codes.SUMMARY, value=summary_text(clinical_summary(findings)),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    report[0].ContentSequence.append(container)


def referenced_segment(seg, segment_number: int) -> hd.sr.ReferencedSegment:
    """``hd.sr.ReferencedSegment.from_segmentation`` that also works on a one-segment SEG.

    With a single segment, highdicom puts SegmentIdentificationSequence in the *shared* functional
    groups, and its own ``from_segmentation`` (0.28.2) looks for it per frame only and fails. The
    reference depends only on the SEG's UIDs and its frames' source images, so we give it a copy
    whose per-frame items carry the shared identification.
    """
    shared = seg.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in seg else None
    if shared is not None and "SegmentIdentificationSequence" in shared and any(
            "SegmentIdentificationSequence" not in fr for fr in seg.PerFrameFunctionalGroupsSequence):
        seg = copy.deepcopy(seg)
        for fr in seg.PerFrameFunctionalGroupsSequence:
            if "SegmentIdentificationSequence" not in fr:
                fr.SegmentIdentificationSequence = copy.deepcopy(shared.SegmentIdentificationSequence)
    return hd.sr.ReferencedSegment.from_segmentation(seg, segment_number)


def _library_images(findings: StudyFindings, gre: GREVolume,
                    qsm: list[pydicom.Dataset] | None = None) -> list[tuple[pydicom.Dataset, int | None]]:
    """The images the planar groups point at, once each, for the Image Library (TID 1600), with the
    frame number for a multi-frame source: the source magnitude's, then the QSM series' (``qsm``,
    one image per slice, see :func:`qsm_slice_images`).

    A classic image is given as its own header. highdicom's Image Library reads PixelSpacing,
    ImageOrientationPatient and ImagePositionPatient at the top level, which an Enhanced MR
    instance keeps in functional groups: for a frame of one, the entry is described by a header
    that holds the instance's UIDs and the frame's plane from the GRE geometry (the same geometry
    the loader built from those functional groups); :func:`_set_library_frames` then adds the
    frame number to the entry.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in gre.source_datasets}
    g = gre.geometry
    out: dict[tuple[str, int | None], tuple[pydicom.Dataset, int | None]] = {}
    for f in findings.microbleeds + findings.mimics:
        k = slice_index(f, gre)
        ref = slice_reference(gre, k)
        if ref is None or ref[1] not in by_uid or (ref[1], ref[2]) in out:
            continue
        ds = by_uid[ref[1]]
        if ref[2] is not None:
            proxy = pydicom.Dataset()
            for kw in ("SOPClassUID", "SOPInstanceUID", "Modality", "FrameOfReferenceUID", "Rows", "Columns"):
                setattr(proxy, kw, ds.get(kw))
            proxy.PixelSpacing = [float(v) for v in g.pixel_spacing()]
            proxy.SliceThickness = float(g.spacing[2])
            proxy.ImageOrientationPatient = [float(v) for v in g.image_orientation()]
            proxy.ImagePositionPatient = [float(v) for v in g.slice_position(k)]
            ds = proxy
        out[(ref[1], ref[2])] = (ds, ref[2])
    if qsm is not None:
        for k in sorted({slice_index(f, gre) for f in findings.microbleeds + findings.mimics}):
            out[(str(qsm[k].SOPInstanceUID), None)] = (qsm[k], None)
    return list(out.values())


def _set_library_frames(report: hd.sr.MeasurementReport, frames: list[int | None]) -> None:
    """Put ReferencedFrameNumber on the Image Library entries of multi-frame images (highdicom
    writes the entries in the order it was given them, within one group per frame of reference)."""
    if all(n is None for n in frames):
        return
    library = [it for it in report[0].ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "111028"]
    entries = [it for grp in library[0].ContentSequence for it in grp.ContentSequence if it.ValueType == "IMAGE"]
    if len(entries) != len(frames):
        raise RuntimeError(f"Image Library has {len(entries)} entries for {len(frames)} images")
    for item, n in zip(entries, frames):
        if n is not None:
            item.ReferencedSOPSequence[0].ReferencedFrameNumber = int(n)


def build_sr(findings: StudyFindings, gre: GREVolume, algorithm_version: str,
             seg: hd.seg.Segmentation | None = None,
             content_datetime: _dt.datetime | None = None,
             qsm_images: Sequence[pydicom.Dataset] | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR dataset (see the module docstring); ``qsm_images``: the headers of the QSM series the
    app wrote, ordered by slice (the circles a viewer draws go on them)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", DEVICE_NAME, algorithm_version), name=DEVICE_NAME,
        manufacturer_name=MANUFACTURER, model_name=f"{DEVICE_NAME} {algorithm_version}")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=device))
    # one reference per segment, shared by the groups of that kind (from_segmentation walks the SEG)
    seg_refs = ({kind: referenced_segment(seg, n)
                 for kind, n in segment_numbers(findings).items()} if seg is not None else {})
    algo = algorithm_identification(findings, algorithm_version)
    qsm = qsm_slice_images(qsm_images, gre)
    library = _library_images(findings, gre, qsm)
    groups = []
    for f in findings.microbleeds + findings.mimics:
        # planar groups first (a viewer merging groups by UID draws the first circle): QSM, magnitude
        on_qsm = qsm[slice_index(f, gre)] if qsm is not None else None
        refs = ([(str(on_qsm.SOPClassUID), str(on_qsm.SOPInstanceUID), None)] if on_qsm is not None else []) + [None]
        groups += [p for p in (_planar_group(f, gre, findings, algo, ref) for ref in refs) if p is not None]
        groups.append(_group(f, gre, findings, seg_refs, algo))
    # highdicom 0.28 builds only the Imaging Measurements container and needs one group in it; a
    # negative study has none, so it is built around a placeholder group and the container is
    # dropped (TID 1500 needs one of its three containers: Qualitative Evaluations is always there)
    placeholder = [] if groups else [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(identifier="none"), finding_type=codes.FINDING_CMB)]
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups or placeholder, title=codes.codes.cid7021.ImagingMeasurementReport,
        referenced_images=[ds for ds, _ in library] or None)
    _set_library_frames(report, [n for _, n in library])
    if placeholder:
        report[0].ContentSequence = [it for it in report[0].ContentSequence
                                     if it.ConceptNameCodeSequence[0].CodeValue != "126010"]
    _append_summary(report, findings)
    series_uid, sop_uid = sr_uids(gre, algorithm_version)
    evidence = list(gre.source_datasets) + (qsm or []) + ([seg] if seg is not None else [])
    now = content_datetime or _dt.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"CMB report (CMB-QSM {algorithm_version})",
        content_date=now.date(), content_time=now.time())
    sr.SoftwareVersions = str(algorithm_version)
    sr.CodingSchemeIdentificationSequence = DicomSequence([codes.private_scheme_item()])
    drop_empty_copied_sequences(sr)
    return sr



def write_sr(findings: StudyFindings, gre: GREVolume, out_dir: Path, algorithm_version: str,
             seg_path: Path | None = None, qsm_paths: Sequence[Path] | None = None) -> Path:
    """Write the SR as ``out_dir/SR_CMB.dcm`` and return its path.

    Args:
        findings: the study's findings (may be empty: the SR then says 0 microbleeds).
        gre: the source acquisition (frame of reference, source images, study, patient).
        out_dir: created if needed.
        algorithm_version: the product's version (observer context, SoftwareVersions, UIDs).
        seg_path: the SEG written by :func:`core.report.seg.write_seg`; when given, each finding's
            group references its segment and the SEG is listed as evidence.
        qsm_paths: the QSM series :func:`core.dicom.derived.write_qsm_series` wrote (ordered by
            slice); when given, each finding gets a circle on its QSM slice too, drawn first.
    """
    seg = hd.seg.segread(seg_path) if seg_path is not None else None
    qsm = [pydicom.dcmread(p, stop_before_pixels=True) for p in qsm_paths] if qsm_paths else None
    return save_in(build_sr(findings, gre, algorithm_version, seg, qsm_images=qsm), out_dir, "SR_CMB.dcm")
