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
* one TID 1501 summary group (tracking identifier ``Microbleed summary``): total number of
  microbleeds, the number per MARS region (finding site + laterality), per MARS category, and the
  number of mimics. A negative study therefore still has one group, saying 0 microbleeds.

Evidence: the source first-echo magnitude images (or the Enhanced MR instance) and the SEG.
UIDs from :mod:`core.uids` (kind ``"SR CMB"``).
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections import Counter
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sequence import Sequence as DicomSequence

from core.dicom.volume import GREVolume
from core.findings import Finding, StudyFindings
from core.mars import MARS_REGIONS
from core.report import codes
from core.report.seg import MANUFACTURER, segment_numbers
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


def _group(f: Finding, gre: GREVolume, findings: StudyFindings, seg_refs: dict[str, hd.sr.ReferencedSegment]):
    tracking = hd.sr.TrackingIdentifier(
        identifier=tracking_label(f),
        uid=derived_uid("finding", findings.study_instance_uid, findings.algorithm_version, str(f.index), f.kind),
    )
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


def _summary_group(findings: StudyFindings) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    cmbs = findings.microbleeds
    m = [hd.sr.Measurement(name=codes.NUMBER_OF_LESIONS, value=float(len(cmbs)), unit=codes.UNIT_COUNT)]
    per_region = Counter((f.mars_region, f.side) for f in cmbs if f.mars_region)
    order = {r.key: r.index for r in MARS_REGIONS}
    for (region, side), n in sorted(per_region.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] or "")):
        m.append(hd.sr.Measurement(name=codes.NUMBER_OF_LESIONS, value=float(n), unit=codes.UNIT_COUNT,
                                   finding_sites=_finding_site(region, side)))
    per_cat = Counter(f.mars_category for f in cmbs if f.mars_category)
    for cat, concept in codes.CATEGORY_COUNT.items():
        m.append(hd.sr.Measurement(name=concept, value=float(per_cat.get(cat, 0)), unit=codes.UNIT_COUNT))
    m.append(hd.sr.Measurement(name=codes.N_MIMICS, value=float(len(findings.mimics)), unit=codes.UNIT_COUNT))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier=codes.TRACKING_SUMMARY,
            uid=derived_uid("summary", findings.study_instance_uid, findings.algorithm_version)),
        finding_type=codes.FINDING_CMB,
        measurements=m,
    )


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


def build_sr(findings: StudyFindings, gre: GREVolume, algorithm_version: str,
             seg: hd.seg.Segmentation | None = None,
             content_datetime: _dt.datetime | None = None) -> hd.sr.Comprehensive3DSR:
    """The SR dataset (see the module docstring)."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", DEVICE_NAME, algorithm_version), name=DEVICE_NAME,
        manufacturer_name=MANUFACTURER, model_name=f"{DEVICE_NAME} {algorithm_version}")
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=device))
    # one reference per segment, shared by the groups of that kind (from_segmentation walks the SEG)
    seg_refs = ({kind: referenced_segment(seg, n)
                 for kind, n in segment_numbers(findings).items()} if seg is not None else {})
    ordered = findings.microbleeds + findings.mimics
    groups = [_group(f, gre, findings, seg_refs) for f in ordered]
    groups.append(_summary_group(findings))
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.PROCEDURE, imaging_measurements=groups,
        title=codes.codes.cid7021.ImagingMeasurementReport)
    series_uid, sop_uid = sr_uids(gre, algorithm_version)
    evidence = list(gre.source_datasets) + ([seg] if seg is not None else [])
    now = content_datetime or _dt.datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=series_uid, series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"CMB report (CMB-QSM {algorithm_version})",
        content_date=now.date(), content_time=now.time())
    sr.SoftwareVersions = str(algorithm_version)
    sr.CodingSchemeIdentificationSequence = DicomSequence([codes.private_scheme_item()])
    return sr


def write_sr(findings: StudyFindings, gre: GREVolume, out_dir: Path, algorithm_version: str,
             seg_path: Path | None = None) -> Path:
    """Write the SR as ``out_dir/SR_CMB.dcm`` and return its path.

    Args:
        findings: the study's findings (may be empty: the SR then says 0 microbleeds).
        gre: the source acquisition (frame of reference, source images, study, patient).
        out_dir: created if needed.
        algorithm_version: the product's version (observer context, SoftwareVersions, UIDs).
        seg_path: the SEG written by :func:`core.report.seg.write_seg`; when given, each finding's
            group references its segment and the SEG is listed as evidence.
    """
    seg = hd.seg.segread(seg_path) if seg_path is not None else None
    sr = build_sr(findings, gre, algorithm_version, seg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "SR_CMB.dcm"
    sr.save_as(path)
    return path
