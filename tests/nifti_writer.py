"""Test helper: write a GRE acquisition as dcm2niix writes a Siemens multi-echo GRE (v1.0.2022).

What dcm2niix does, checked against dcm2niix v1.0.20220720 on our simulated Siemens DICOM (the
integration test compares the two outputs voxel for voxel when dcm2niix is installed):

* one file per echo and series: ``<SeriesDescription>_<SeriesNumber>_e<N>.nii.gz`` (magnitude) and
  ``<PhaseSeriesDescription>_<SeriesNumber>_e<N>_ph.nii.gz`` (phase), each with a ``.json`` sidecar;
* int16 voxels holding the DICOM *stored* values; the DICOM rescale goes to scl_slope/scl_inter
  (Siemens phase: 2 and -4096);
* the array in RAS order with the DICOM column and row axes both reversed for an axial stack
  (RAS affine with a positive diagonal), sform and qform code 1;
* sidecar keys: EchoTime (s), EchoNumber, MagneticFieldStrength, ImagingFrequency, Manufacturer
  ("Siemens"), ImageType (with "PHASE" appended for phase), SeriesNumber, SeriesDescription,
  ImageOrientationPatientDICOM, PhaseEncodingAxis, ConversionSoftware.

``bids=True`` writes BIDS names instead (``sub-<id>_echo-<N>_part-mag|phase_MEGRE``) and leaves
ImageType out, so the reader must go by the names.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from core.geometry import LPS_TO_RAS


def write_dcm2niix_like(out: Path, magnitude: np.ndarray, phase_rad: np.ndarray, echo_times_s, geometry, *,
                        field_strength_t: float = 3.0, bids: bool = False, subject: str = "01",
                        drop: tuple[str, ...] = (), only: str | None = None) -> list[Path]:
    """Write magnitude and Siemens-integer phase echoes; ``drop`` removes sidecar keys, ``only``
    (``"M"`` or ``"P"``) writes one component."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flip = np.eye(4)
    flip[0, 0] = flip[1, 1] = -1
    flip[0, 3], flip[1, 3] = geometry.shape[0] - 1, geometry.shape[1] - 1
    affine = LPS_TO_RAS @ geometry.affine @ flip
    mag = np.rint(np.asarray(magnitude, dtype=np.float64)).astype(np.int16)
    rescaled = np.rint(np.asarray(phase_rad, dtype=np.float64) * 4096.0 / np.pi)
    stored = np.clip((rescaled + 4096.0) / 2.0, 0, 4095).astype(np.int16)
    iop = [round(float(v), 8) for v in geometry.image_orientation()]
    written = []
    for comp, series, arr in (("M", 5, mag), ("P", 6, stored)):
        if only and comp != only:
            continue
        for e in range(arr.shape[0]):
            data = arr[e][::-1, ::-1, :]
            img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
            img.header.set_sform(affine, code=1)
            img.header.set_qform(affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            if comp == "P":
                img.header.set_slope_inter(2.0, -4096.0)
            if bids:
                part = "mag" if comp == "M" else "phase"
                name = f"sub-{subject}_echo-{e + 1}_part-{part}_MEGRE"
            else:
                name = f"QSM_GRE_3D_ME_{series}_e{e + 1}" if comp == "M" else f"QSM_GRE_3D_ME_PHA_{series}_e{e + 1}_ph"
            side = {
                "Modality": "MR", "MagneticFieldStrength": field_strength_t,
                "ImagingFrequency": round(42.577478 * field_strength_t, 4), "Manufacturer": "Siemens",
                "ManufacturersModelName": "Prisma", "SeriesDescription": "QSM_GRE_3D_ME" + ("_PHA" if comp == "P" else ""),
                "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"] if comp == "M" else ["ORIGINAL", "PRIMARY", "P", "ND", "PHASE"],
                "SeriesNumber": series, "EchoNumber": e + 1, "EchoTime": float(echo_times_s[e]),
                "RepetitionTime": 0.035, "PhaseEncodingAxis": "j", "ImageOrientationPatientDICOM": iop,
                "ConversionSoftware": "dcm2niix", "ConversionSoftwareVersion": "v1.0.20220720",
            }
            if bids:
                side.pop("ImageType")
            for key in drop:
                side.pop(key, None)
            path = out / f"{name}.nii.gz"
            nib.save(img, str(path))
            (out / f"{name}.json").write_text(json.dumps(side, indent=1))
            written.append(path)
    return written
