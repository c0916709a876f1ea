"""Classic (single-frame) MR Image Storage -> :class:`~core.dicom.frames.Frame`.

One classic instance is one image plane. This module reads its header into a Frame and decides what
its pixels hold (magnitude, phase, real, imaginary) from ImageType, or from GE's private image-type
tag (0043,102F) when ImageType says only ``OTHER``. Nothing here scales phase: that is
:mod:`core.dicom.phase_scaling`'s job once a whole stack is known.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pydicom

from core.dicom.frames import Frame
from core.errors import DicomInputError

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"

#: GE (0043,102F) "Image Type (real, imaginary, phase, magnitude)" codes.
GE_IMAGE_TYPE_CODES = {0: "M", 1: "P", 2: "R", 3: "I"}

_COMPONENT_TOKENS = {
    "P": {"P", "PHASE", "PHASE MAP", "PHASE_MAP", "PHA"},
    "R": {"R", "REAL"},
    "I": {"I", "IMAGINARY", "IMAG"},
    "M": {"M", "MAG", "MAGNITUDE"},
}
_PREFIX = {"P": re.compile(r"^P_"), "R": re.compile(r"^R_"), "I": re.compile(r"^I_"), "M": re.compile(r"^M_")}


def component_from_image_type(image_type: Sequence[str], ge_code: int | None = None) -> str | None:
    """What an image's pixels hold, from ImageType values (and the GE private code if any).

    Recognised: Siemens ``...\\M\\ND`` / ``...\\P\\ND``; Philips ``M_FFE\\M\\FFE`` /
    ``PHASE MAP\\P\\FFE`` (and ``R_FFE``, ``I_FFE``); the DICOM terms ``MAGNITUDE``, ``PHASE``,
    ``REAL``, ``IMAGINARY``; GE ``OTHER`` with (0043,102F) 0..3 = M, P, R, I.
    Values 1 and 2 (ORIGINAL/DERIVED, PRIMARY/SECONDARY) are ignored. Phase wins over magnitude
    when both appear, since phase types often also carry magnitude-like tokens.

    Returns:
        ``"M"``, ``"P"``, ``"R"``, ``"I"`` or ``None`` when nothing says.
    """
    tokens = [str(t).strip().upper() for t in list(image_type)[2:]]
    for comp in ("P", "R", "I", "M"):
        if any(t in _COMPONENT_TOKENS[comp] or _PREFIX[comp].match(t) for t in tokens):
            return comp
    if ge_code is not None:
        return GE_IMAGE_TYPE_CODES.get(int(ge_code))
    return None


def ge_image_type_code(ds: pydicom.Dataset) -> int | None:
    """GE (0043,102F) under private creator ``GEMS_PARM_01``, or ``None``.

    Works for explicit and implicit VR files (implicit VR: the raw 2 bytes are decoded as SS).
    """
    try:
        elem = ds.get_private_item(0x0043, 0x2F, "GEMS_PARM_01")
    except KeyError:
        return None
    value = elem.value
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        return int.from_bytes(bytes(value[:2]), "little", signed=True)
    try:
        return int(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)
    except (TypeError, ValueError):
        return None


def _float_or_none(ds: pydicom.Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    except (TypeError, ValueError):
        return None


def _int_or_none(ds: pydicom.Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    except (TypeError, ValueError):
        return None


def truncated_pixel_data(ds: pydicom.Dataset) -> str | None:
    """"N of M bytes" when the native (uncompressed) PixelData of ``ds`` is shorter than its
    Rows x Columns x SamplesPerPixel x BitsAllocated x NumberOfFrames say, else None."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None or getattr(ts, "is_compressed", True) or "PixelData" not in ds:
        return None
    try:
        bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
        expected = (bits * int(ds.get("NumberOfFrames", 1) or 1) + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return None
    got = len(ds.PixelData)
    return f"{got} of {expected} bytes" if got < expected else None


def frames_from_classic(ds: pydicom.Dataset) -> list[Frame]:
    """The single :class:`Frame` of a classic MR image (empty list if it has no image plane).

    An instance without PixelData, ImagePositionPatient, ImageOrientationPatient or PixelSpacing
    cannot be placed in space and gives no frame (e.g. a localiser exported without geometry).
    """
    if "PixelData" not in ds:
        return []
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if not ds.get(keyword):
            return []
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    ge_code = ge_image_type_code(ds)
    private = {}
    if ge_code is not None:
        private["ge_image_type"] = ge_code
    slope = _float_or_none(ds, "RescaleSlope")
    intercept = _float_or_none(ds, "RescaleIntercept")
    rescale_type = ds.get("RescaleType")
    acq_number = ds.get("AcquisitionNumber")

    def pixels(ds: pydicom.Dataset = ds) -> np.ndarray:
        short = truncated_pixel_data(ds)
        if short:
            raise DicomInputError(f"truncated pixel data in instance {ds.get('SOPInstanceUID', '?')}: {short}")
        try:
            return ds.pixel_array
        except Exception as exc:  # pydicom raises several types for undecodable pixel data
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise DicomInputError(
                f"cannot decode pixel data of instance {ds.get('SOPInstanceUID', '?')} "
                f"(transfer syntax {ts}): {exc}"
            ) from exc

    return [
        Frame(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            frame_number=None,
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            study_instance_uid=str(ds.get("StudyInstanceUID", "")),
            frame_of_reference_uid=str(ds.FrameOfReferenceUID) if ds.get("FrameOfReferenceUID") else None,
            series_number=_int_or_none(ds, "SeriesNumber"),
            series_description=str(ds.get("SeriesDescription", "")),
            manufacturer=str(ds.get("Manufacturer", "")),
            image_type=image_type,
            component=component_from_image_type(image_type, ge_code),
            echo_time_ms=_float_or_none(ds, "EchoTime"),
            echo_number=_int_or_none(ds, "EchoNumbers"),
            position=np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
            orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64),
            pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            slice_thickness=_float_or_none(ds, "SliceThickness"),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            rescale_type=str(rescale_type) if rescale_type else None,
            field_strength_t=_field_strength(ds),
            acquisition_key="" if acq_number in (None, "") else str(acq_number),
            private=private,
            pixels=pixels,
            dataset=ds,
        )
    ]


def _field_strength(ds: pydicom.Dataset) -> float | None:
    """MagneticFieldStrength (T); if absent, ImagingFrequency (MHz) / 42.576 rounded to 0.01 T."""
    b0 = _float_or_none(ds, "MagneticFieldStrength")
    if b0 is not None and b0 > 0:
        # some systems write gauss (e.g. 15000 for 1.5 T)
        return b0 / 1e4 if b0 > 100 else b0
    f = _float_or_none(ds, "ImagingFrequency")
    if f is not None and f > 0:
        return round(f / 42.576, 2)
    return None
