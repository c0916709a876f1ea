"""Key Object Selection document pointing a viewer at the results of one study, with highdicom.

:func:`write_kos` writes one Key Object Selection Document (``hd.ko.KeyObjectSelectionDocument``,
TID 2010) into the source study, in its own series:

* document title DCM 113000 "Of Interest" (CID 7010 Key Object Selection Document Title);
* key object description: the microbleed count and what is referenced;
* observer context: the same device (``CMB-QSM`` and its version) as the SR;
* referenced objects: the key images (Secondary Capture, one per finding, microbleeds first) and
  the SR; each listed in CurrentRequestedProcedureEvidenceSequence as highdicom does;
* a study without findings has no key images: no KOS (the SR alone says 0 microbleeds), as a study
  with nothing segmented has no SEG;
* UIDs from :mod:`core.uids` (kind ``"KO CMB"``), so a re-sent result replaces, never duplicates.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from core.dicom.volume import GREVolume
from core.findings import StudyFindings
from core.report.seg import MANUFACTURER, drop_empty_copied_sequences, save_in
from core.report.sr import DEVICE_NAME
from core.uids import derived_uid, result_instance_uid, result_series_uid

KO_KIND = "KO CMB"
SERIES_NUMBER = 904
#: DCM 113000 "Of Interest" (CID 7010).
TITLE = codes.DCM.OfInterest


def kos_uids(gre: GREVolume, algorithm_version: str) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the KOS for this acquisition and version."""
    series = result_series_uid(gre.study_instance_uid, gre.magnitude_series_uid, KO_KIND, algorithm_version)
    return series, result_instance_uid(series, 0)


def build_kos(findings: StudyFindings, gre: GREVolume, algorithm_version: str,
              key_images: list[pydicom.Dataset], sr: pydicom.Dataset) -> hd.ko.KeyObjectSelectionDocument | None:
    """The KOS dataset referencing ``key_images`` and ``sr``; ``None`` without key images."""
    if not key_images:
        return None
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("device", DEVICE_NAME, algorithm_version), name=DEVICE_NAME,
        manufacturer_name=MANUFACTURER, model_name=f"{DEVICE_NAME} {algorithm_version}")
    n = len(findings.microbleeds)
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=[*key_images, sr],
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
            observer_identifying_attributes=device),
        description=(f"CMB-QSM: {n} microbleed{'s' if n != 1 else ''}, {len(findings.mimics)} mimic(s); "
                     f"{len(key_images)} key image(s) and the measurement report"),
    )
    series_uid, sop_uid = kos_uids(gre, algorithm_version)
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[*key_images, sr], content=content, series_instance_uid=series_uid,
        series_number=SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER)
    kos.SeriesDescription = f"CMB key objects (CMB-QSM {algorithm_version})"
    drop_empty_copied_sequences(kos)
    return kos


def write_kos(findings: StudyFindings, gre: GREVolume, out_dir: Path, algorithm_version: str,
              key_image_paths: list[Path], sr_path: Path) -> Path | None:
    """Write the KOS as ``out_dir/KO_CMB.dcm``; ``None`` (nothing written) without key images.

    Args:
        findings: the study's findings (the description counts them).
        gre: the source acquisition (study and series the UIDs derive from).
        out_dir: created if needed.
        algorithm_version: the product's version (observer context, UIDs).
        key_image_paths: the files :func:`core.report.keyimages.write_key_images` wrote.
        sr_path: the file :func:`core.report.sr.write_sr` wrote.
    """
    keys = [pydicom.dcmread(p, stop_before_pixels=True) for p in key_image_paths]
    kos = build_kos(findings, gre, algorithm_version, keys, pydicom.dcmread(sr_path))
    return None if kos is None else save_in(kos, out_dir, "KO_CMB.dcm")
