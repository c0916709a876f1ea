"""Turn one Enhanced MR Image Storage (multi-frame) instance into per-frame :class:`Frame` records.

Enhanced MR (SOP Class 1.2.840.10008.5.1.4.1.1.4.1), as Siemens XA and Philips R5+ scanners send
it, keeps the facts that a classic instance has at top level inside functional groups: each frame's
attributes are the union of its item in PerFrameFunctionalGroupsSequence and the single item of
SharedFunctionalGroupsSequence (a macro sits in one or the other; the per-frame one wins if a writer
put it in both). This module resolves them so the series selector never looks at the storage
class again (see :mod:`core.dicom.frames`).

What is read, per frame (per-frame group first, then shared group, then the top-level attribute
where one exists as a fallback):

* position: PlanePositionSequence > ImagePositionPatient (required);
* orientation: PlaneOrientationSequence > ImageOrientationPatient (required);
* pixel spacing / slice thickness: PixelMeasuresSequence > PixelSpacing (required), SliceThickness;
* echo time: MREchoSequence > EffectiveEchoTime (ms); top-level EchoTime as a fallback;
* frame type and component: MRImageFrameTypeSequence > FrameType, ComplexImageComponent
  (MAGNITUDE/PHASE/REAL/IMAGINARY -> "M"/"P"/"R"/"I"); if that is absent or MIXED, FrameType
  value 3 when it is M/P/R/I (Siemens XA style) or starts with "M_"/"P_"/"R_"/"I_" (Philips style),
  else the top-level ComplexImageComponent; the top-level ImageType stands in for a missing FrameType;
* rescale: PixelValueTransformationSequence > RescaleSlope / RescaleIntercept / RescaleType
  (then top-level RescaleSlope / RescaleIntercept; identity if absent): vendor phase conventions
  (Siemens * pi / 4096, Philips radians or mrad) are applied later, by the selector;
* echo number: EchoNumbers where one exists (Legacy Converted Enhanced MR); else the frame's
  DimensionIndexValues entry for a dimension that points at EffectiveEchoTime (0018,9082), when
  the instance declares one; else ``None``;
* acquisition key: AcquisitionNumber (top level or unassigned groups), else the frame's
  FrameContentSequence > FrameAcquisitionNumber, as a string; ``""`` if neither exists.

Legacy Converted Enhanced MR (1.2.840.10008.5.1.4.1.1.4.4) keeps classic attributes such as
EchoTime, EchoNumbers, AcquisitionNumber and MagneticFieldStrength in the Unassigned Per-Frame /
Shared Converted Attributes groups; those are read too (per-frame, then shared, then top level).

Malformed input raises :class:`core.errors.DicomInputError` with a one-line reason.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pydicom

from core.dicom.classic import truncated_pixel_data
from core.dicom.frames import Frame
from core.errors import DicomInputError

_EFFECTIVE_ECHO_TIME = 0x00189082
_COMPONENT_CODES = {"MAGNITUDE": "M", "PHASE": "P", "REAL": "R", "IMAGINARY": "I"}
_SHORT_COMPONENTS = {"M", "P", "R", "I"}


def frames_from_enhanced(ds: pydicom.Dataset) -> list[Frame]:
    """One :class:`Frame` per frame of a multi-frame (Enhanced MR) instance, in frame order.

    Args:
        ds: the instance. It may have been read with ``stop_before_pixels=True`` provided it was
            read from a file: ``Frame.pixels`` then re-reads the file (``ds.filename``) once.

    Returns:
        ``len == NumberOfFrames`` frames; ``frame_number`` is 1-based; ``pixels()`` returns that
        frame's stored (pre-rescale) values as a ``[row, col]`` array (a copy); ``dataset`` is ``ds``.

    Raises:
        DicomInputError: a required functional group is missing or a value cannot be parsed.
    """
    name = _describe(ds)
    n_frames = _int(ds.get("NumberOfFrames"), f"{name}: NumberOfFrames")
    if n_frames is None or n_frames < 1:
        raise DicomInputError(f"{name}: NumberOfFrames missing or not positive; not a multi-frame image")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        got = "missing" if per_frame is None else f"{len(per_frame)} items"
        raise DicomInputError(
            f"{name}: PerFrameFunctionalGroupsSequence is {got} for {n_frames} frames (malformed instance)"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else pydicom.Dataset()
    rows = _int(ds.get("Rows"), f"{name}: Rows")
    columns = _int(ds.get("Columns"), f"{name}: Columns")
    if not rows or not columns:
        raise DicomInputError(f"{name}: Rows / Columns missing")
    spp = _int(ds.get("SamplesPerPixel", 1), f"{name}: SamplesPerPixel")
    if spp != 1:
        raise DicomInputError(f"{name}: {spp} samples per pixel; only greyscale MR images are usable")

    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    if not sop_uid:
        raise DicomInputError(f"{name}: SOPInstanceUID missing")
    series_number = _int(ds.get("SeriesNumber"), f"{name}: SeriesNumber")
    top_image_type = tuple(str(v).upper() for v in _as_list(ds.get("ImageType")))
    top_cic = str(ds.get("ComplexImageComponent", "") or "").upper()
    echo_dim = _echo_dimension(ds)
    pixels_of = _pixel_loader(ds, n_frames, rows, columns, name)

    frames = []
    for index, item in enumerate(per_frame):
        where = f"{name} frame {index + 1}"

        def group(keyword: str) -> pydicom.Dataset | None:
            return _group(item, shared, keyword)

        pos_item = group("PlanePositionSequence")
        if pos_item is None or "ImagePositionPatient" not in pos_item:
            raise DicomInputError(f"{where}: no PlanePositionSequence / ImagePositionPatient")
        position = _vector(pos_item.ImagePositionPatient, 3, f"{where}: ImagePositionPatient")
        ori_item = group("PlaneOrientationSequence")
        if ori_item is None or "ImageOrientationPatient" not in ori_item:
            raise DicomInputError(f"{where}: no PlaneOrientationSequence / ImageOrientationPatient")
        orientation = _vector(ori_item.ImageOrientationPatient, 6, f"{where}: ImageOrientationPatient")
        if np.linalg.norm(orientation[:3]) == 0 or np.linalg.norm(orientation[3:]) == 0:
            raise DicomInputError(f"{where}: ImageOrientationPatient has a zero-length direction")
        pm_item = group("PixelMeasuresSequence")
        if pm_item is None or "PixelSpacing" not in pm_item:
            raise DicomInputError(f"{where}: no PixelMeasuresSequence / PixelSpacing")
        spacing = _vector(pm_item.PixelSpacing, 2, f"{where}: PixelSpacing")
        if np.any(spacing <= 0):
            raise DicomInputError(f"{where}: PixelSpacing {spacing.tolist()} is not positive")
        thickness = _float(pm_item.get("SliceThickness"), f"{where}: SliceThickness")

        def converted(keyword: str):
            return _converted(item, shared, ds, keyword)

        echo_item = group("MREchoSequence")
        echo_ms = None
        if echo_item is not None:
            echo_ms = _float(echo_item.get("EffectiveEchoTime"), f"{where}: EffectiveEchoTime")
        if echo_ms is None:
            echo_ms = _float(_first(converted("EchoTime")), f"{where}: EchoTime")
        field_t = _float(converted("MagneticFieldStrength"), f"{where}: MagneticFieldStrength")

        ft_item = group("MRImageFrameTypeSequence")
        image_type = top_image_type
        cic = ""
        if ft_item is not None:
            if "FrameType" in ft_item:
                image_type = tuple(str(v).upper() for v in _as_list(ft_item.FrameType))
            cic = str(ft_item.get("ComplexImageComponent", "") or "").upper()
        component = _component(cic, image_type, top_cic)

        pvt = group("PixelValueTransformationSequence")
        src = pvt if pvt is not None else ds
        slope = _float(src.get("RescaleSlope"), f"{where}: RescaleSlope")
        intercept = _float(src.get("RescaleIntercept"), f"{where}: RescaleIntercept")
        slope = 1.0 if slope is None else slope
        intercept = 0.0 if intercept is None else intercept
        if slope == 0.0:
            raise DicomInputError(f"{where}: RescaleSlope is 0")
        rescale_type = str(src.get("RescaleType", "") or "") or None

        echo_number = _int(_first(converted("EchoNumbers")), f"{where}: EchoNumbers")
        content = _group(item, shared, "FrameContentSequence")
        acq_number = converted("AcquisitionNumber")
        if acq_number in (None, "") and content is not None:
            acq_number = content.get("FrameAcquisitionNumber")
        acquisition_key = "" if acq_number in (None, "") else str(acq_number)
        has_index = content is not None and "DimensionIndexValues" in content
        if echo_number is None and echo_dim is not None and has_index:
            values = _as_list(content.DimensionIndexValues)
            if echo_dim < len(values):
                echo_number = _int(values[echo_dim], f"{where}: DimensionIndexValues")

        frames.append(
            Frame(
                sop_instance_uid=sop_uid,
                frame_number=index + 1,
                series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
                frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
                series_number=series_number,
                series_description=str(ds.get("SeriesDescription", "") or ""),
                manufacturer=str(ds.get("Manufacturer", "") or ""),
                image_type=image_type,
                component=component,
                echo_time_ms=echo_ms,
                echo_number=echo_number,
                position=position,
                orientation=orientation,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slice_thickness=thickness,
                rows=rows,
                columns=columns,
                rescale_slope=slope,
                rescale_intercept=intercept,
                rescale_type=rescale_type,
                field_strength_t=field_t,
                acquisition_key=acquisition_key,
                private={},
                pixels=pixels_of(index),
                dataset=ds,
            )
        )
    return frames


# ---------------------------------------------------------------------------------- helpers
def _describe(ds: pydicom.Dataset) -> str:
    series = ds.get("SeriesNumber", "?")
    desc = str(ds.get("SeriesDescription", "") or "")
    uid = str(ds.get("SOPInstanceUID", "") or "?")
    return f"Enhanced MR instance {uid} (series {series} '{desc}')"


def _group(item: pydicom.Dataset, shared: pydicom.Dataset, keyword: str) -> pydicom.Dataset | None:
    """First item of functional group ``keyword`` from the per-frame item, else the shared one."""
    for source in (item, shared):
        seq = source.get(keyword)
        if seq is not None and len(seq) > 0:
            return seq[0]
    return None


def _converted(item: pydicom.Dataset, shared: pydicom.Dataset, ds: pydicom.Dataset, keyword: str):
    """A classic attribute: Legacy Converted per-frame / shared unassigned groups, then top level."""
    for source, seq_keyword in ((item, "UnassignedPerFrameConvertedAttributesSequence"),
                                (shared, "UnassignedSharedConvertedAttributesSequence")):
        seq = source.get(seq_keyword)
        if seq and keyword in seq[0]:
            return seq[0].get(keyword)
    return ds.get(keyword)


def _first(value):
    values = _as_list(value)
    return values[0] if values else None


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]


def _float(value, what: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DicomInputError(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(out):
        raise DicomInputError(f"{what} is not finite: {value!r}")
    return out


def _int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DicomInputError(f"{what} is not an integer: {value!r}") from None


def _vector(value, n: int, what: str) -> np.ndarray:
    values = _as_list(value)
    if len(values) != n:
        raise DicomInputError(f"{what} has {len(values)} values, expected {n}")
    out = [_float(v, what) for v in values]
    if any(v is None for v in out):
        raise DicomInputError(f"{what} has an empty value")
    return np.array(out, dtype=np.float64)


def _component(cic: str, image_type: tuple[str, ...], top_cic: str) -> str | None:
    """M / P / R / I from ComplexImageComponent, else FrameType value 3, else the top level."""
    if cic in _COMPONENT_CODES:
        return _COMPONENT_CODES[cic]
    if len(image_type) >= 3:
        flavour = image_type[2]
        if flavour in _SHORT_COMPONENTS:
            return flavour
        if len(flavour) > 2 and flavour[1] == "_" and flavour[0] in _SHORT_COMPONENTS:
            return flavour[0]
    if top_cic in _COMPONENT_CODES:
        return _COMPONENT_CODES[top_cic]
    return None


def _echo_dimension(ds: pydicom.Dataset) -> int | None:
    """Index into DimensionIndexValues of a dimension that points at EffectiveEchoTime, if any."""
    for i, dim in enumerate(ds.get("DimensionIndexSequence") or []):
        pointer = dim.get("DimensionIndexPointer")
        if pointer is not None and int(pointer) == _EFFECTIVE_ECHO_TIME:
            return i
    return None


def _pixel_loader(
    ds: pydicom.Dataset, n_frames: int, rows: int, columns: int, name: str
) -> Callable[[int], Callable[[], np.ndarray]]:
    """Per-frame accessors sharing one decoded ``[frame, row, col]`` array, decoded on first use."""
    cache: dict[str, np.ndarray] = {}

    def all_frames() -> np.ndarray:
        if "frames" not in cache:
            source = ds
            if "PixelData" not in ds:
                filename = getattr(ds, "filename", None)
                if not isinstance(filename, str) or not filename:
                    raise DicomInputError(f"{name}: no PixelData and no file to read it from")
                try:
                    source = pydicom.dcmread(filename)
                except Exception as exc:  # noqa: BLE001 - any read failure is an input problem
                    raise DicomInputError(f"{name}: cannot re-read pixel data from {filename}: {exc}") from exc
            short = truncated_pixel_data(source)
            if short:
                raise DicomInputError(f"{name}: truncated pixel data ({short})")
            try:
                arr = source.pixel_array
            except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
                raise DicomInputError(f"{name}: pixel data cannot be decoded: {exc}") from exc
            if n_frames == 1 and arr.ndim == 2:
                arr = arr[np.newaxis]
            if arr.shape != (n_frames, rows, columns):
                raise DicomInputError(
                    f"{name}: pixel data has shape {arr.shape}, header says {(n_frames, rows, columns)}"
                )
            cache["frames"] = arr
        return cache["frames"]

    def accessor(index: int) -> Callable[[], np.ndarray]:
        return lambda: np.array(all_frames()[index])

    return accessor
