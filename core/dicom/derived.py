"""The QSM map as a derived MR series for PACS, and reading it back.

:func:`write_qsm_series` writes one classic MR Image Storage instance per slice, on exactly the
source acquisition's grid (ImagePositionPatient / ImageOrientationPatient / PixelSpacing from
:class:`core.geometry.Geometry`), in the source's study and frame of reference, so that a viewer
can link and overlay it with the GRE images.

What is written (PS3.3 A.4 MR Image IOD; checked with dciodvfy, no errors):

* ImageType ``DERIVED\\SECONDARY\\QSM``: value 3 of the MR Image module has *defined* terms
  (MPR, T1 MAP, PHASE MAP, ...), which may be extended; dciodvfy only warns "Unrecognized defined term <QSM>". The GRE loader
  sees no magnitude/phase token in it, so a QSM series sent back into the node is never mistaken
  for an input.
* Pixel values: signed 16-bit stored values ``s``; the Modality LUT gives parts per billion,
  ``chi_ppb = s * RescaleSlope + 0`` (RescaleIntercept 0, RescaleType ``PPB``), and
  ``chi_ppm = s * RealWorldValueSlope`` (RealWorldValueMappingSequence, MeasurementUnitsCodeSequence
  UCUM ``ppm``, the standard carrier of a quantity's unit, which the MR IOD includes). The ppm
  step is :data:`DEFAULT_SLOPE_PPM` (0.0005 ppm = 0.5 ppb per stored unit, range +-16.38 ppm)
  unless the map holds larger magnitudes, in which case the next step in the 1-2-5 sequence that
  fits is used: nothing is clipped. Non-finite values are written as 0. Why ppb and not ppm after
  the Modality LUT: a QSM window is a fraction of a ppm wide, and a window narrower than 1 is
  only valid with VOILUTFunction ``LINEAR_EXACT`` (dciodvfy rejects it with the default
  ``LINEAR``); OHIF 3.13 (Cornerstone3D) mishandles ``LINEAR_EXACT`` (its volume viewport drops
  the function and computes an inverted range from the ``LINEAR`` formula, lower -0.2 / upper
  -0.8 for 0 / 0.4, so the viewport was one flat grey level; its stack viewport raises "Invalid
  VOI LUT function"), and other viewers ignore it. In ppb the window is hundreds of units wide and
  the default ``LINEAR`` function is exact enough everywhere. dciodvfy warns that
  RescaleSlope/Intercept/Type are not part of the standard MR IOD (it still reads them;
  SimpleITK, pydicom and viewers apply them: they see ppb) but reports no error. The unit is also
  stated in SeriesDescription, DerivationDescription and WindowCenterWidthExplanation.
  :func:`qsm_from_frames` reads ``PPB`` back as ppm (and any other RescaleType, e.g. a
  scanner's map or a series written before this change, as ppm).
* Window :data:`WINDOW_PPM` -0.3..+0.5 ppm (the key images' window, so the series and the key
  images look alike: paramagnetic microbleeds and veins bright, calcifications dark), written
  for the ``LINEAR`` function in ppb: WindowCenter 100.5, WindowWidth 801 (PS3.3 C.11.2.1.2.1:
  black at or below c - 0.5 - (w - 1) / 2 = -300, white above c - 0.5 + (w - 1) / 2 = 500).
* Study, patient and frame of reference copied from the source (``gre.source_datasets[0]``,
  ``gre.patient``, ``gre.geometry.frame_of_reference_uid``); acquisition attributes the MR
  Image module requires (ScanningSequence, SequenceVariant, ...) copied from the source, with
  EchoTime empty (type 2: the map combines all echoes).
* Equipment: Manufacturer ``CMB-QSM open source``, SoftwareVersions = ``algorithm_version``.
* Provenance: SourceImageSequence per slice (the first-echo magnitude image at that position;
  for an Enhanced MR source, the multi-frame instance(s), without frame numbers),
  DerivationDescription naming the method, version and the source magnitude and phase series.
* UIDs from :mod:`core.uids`: the same study, source series, method and version always give the
  same Series and SOP Instance UIDs (a re-sent result replaces, never duplicates).
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from core.dicom.frames import Frame
from core.dicom.reader import _check_grid, _Echo, _Stack, _stack_values, frames_from_dataset, scan_folder
from core.dicom.volume import GREVolume
from core.errors import DicomInputError
from core.geometry import Geometry
from core.uids import result_instance_uid, result_series_uid

MANUFACTURER = "CMB-QSM open source"
MODEL_NAME = "CMB-QSM node"
DEFAULT_SLOPE_PPM = 0.0005
RESCALE_TYPE = "PPB"
#: ppb per ppm: the Modality LUT (RescaleSlope) is in ppb, the real-world value mapping in ppm
PPB_PER_PPM = 1000.0
#: display window (low, high) in ppm
WINDOW_PPM = (-0.3, 0.5)
IMAGE_TYPE = ["DERIVED", "SECONDARY", "QSM"]
METHODS = ("STAR-QSM", "TKD")

_INT16_MAX = 32767

#: Copied from the source when present (Patient, Patient Study, General Study, Frame of Reference,
#: series-level constants).
_COPIED = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
    "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription", "InstitutionName",
    "PositionReferenceIndicator",
    "BodyPartExamined", "PatientPosition",
    # MR Image module attributes describing the acquisition the map was computed from
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
    "EchoTrainLength", "MagneticFieldStrength", "ImagingFrequency", "ImagedNucleus", "FlipAngle",
    "SliceThickness",
)
#: Type 1/2 attributes of the General Study / MR Image modules written empty when the source lacks them.
_TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
                "ScanOptions", "EchoTrainLength", "RepetitionTime")


def _ds_str(value: float, max_len: int = 16) -> str:
    """A DS string of at most 16 characters with as many significant digits as fit."""
    for digits in range(15, 0, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= max_len:
            return s
    raise ValueError(f"cannot write {value} as DS")


def choose_slope(chi_ppm: np.ndarray) -> float:
    """RescaleSlope (ppm per stored unit): 0.0005, or the next 1-2-5 step that holds max |chi|."""
    finite = np.asarray(chi_ppm)[np.isfinite(chi_ppm)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    slope = DEFAULT_SLOPE_PPM
    steps = (1.0, 2.0, 5.0)
    exp, i = -4, 2  # 0.0005 = steps[2] * 1e-4
    while peak / slope > _INT16_MAX - 0.5:
        i += 1
        if i == len(steps):
            i, exp = 0, exp + 1
        slope = steps[i] * 10.0**exp
    return float(f"{slope:.1g}")


def explicit_le_file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """File meta information of an instance written in Explicit VR Little Endian (every file the
    product and its simulator write)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def linear_window(low_ppm: float, high_ppm: float) -> tuple[float, float]:
    """(WindowCenter, WindowWidth) in ppb for the default ``LINEAR`` VOI function that maps
    ``low_ppm`` and below to black and above ``high_ppm`` to white (PS3.3 C.11.2.1.2.1)."""
    lo, hi = low_ppm * PPB_PER_PPM, high_ppm * PPB_PER_PPM
    return (lo + hi + 1.0) / 2.0, hi - lo + 1.0


def _source_header(gre: GREVolume) -> pydicom.Dataset | None:
    return gre.source_datasets[0] if gre.source_datasets else None


def write_qsm_series(
    chi_ppm: np.ndarray,
    gre: GREVolume,
    out_dir: Path,
    *,
    method: str,
    algorithm_version: str,
    background: str = "V-SHARP",
    series_number: int = 900,
    content_datetime: _dt.datetime | None = None,
) -> list[Path]:
    """Write a susceptibility map as a derived MR series, one file per slice.

    Args:
        chi_ppm: susceptibility ``[i, j, k]`` in ppm on ``gre.geometry``'s grid.
        gre: the acquisition the map was computed from (geometry, study, patient, source images).
        out_dir: folder to write into (created); files are ``QSM_<method>_<k+1:04d>.dcm``.
        method: reconstruction method, ``"STAR-QSM"`` or ``"TKD"``.
        background: the background field removal before it (``"V-SHARP"``, ``"PDF"``, ``"LBV"``),
            named in DerivationDescription; a non-default one is part of the UIDs (another map,
            other instances).
        algorithm_version: the product's algorithm version; goes into SoftwareVersions and the UIDs.
        series_number: SeriesNumber of the result series.
        content_datetime: ContentDate/Time, SeriesDate/Time and InstanceCreation; now if ``None``.

    Returns:
        The written paths, ordered by slice index ``k``.
    """
    chi = np.asarray(chi_ppm)
    g = gre.geometry
    if chi.shape != tuple(g.shape):
        raise ValueError(f"QSM map shape {chi.shape} differs from the acquisition grid {tuple(g.shape)}")
    if method not in METHODS:
        raise ValueError(f"unknown QSM method {method!r}; expected one of {METHODS}")
    if not algorithm_version:
        raise ValueError("algorithm_version is empty")
    src = _source_header(gre)
    study_uid = gre.study_instance_uid or (str(src.StudyInstanceUID) if src is not None else "")
    source_series = gre.magnitude_series_uid or (str(src.SeriesInstanceUID) if src is not None else "")
    if not study_uid or not source_series:
        raise ValueError("the GRE volume has no StudyInstanceUID / source SeriesInstanceUID to derive from")
    for_uid = g.frame_of_reference_uid or (str(src.get("FrameOfReferenceUID", "")) if src is not None else "")
    if not for_uid:
        raise ValueError("the GRE volume has no FrameOfReferenceUID: the map could not be placed on the source")

    kind = f"QSM {method}" + ("" if background == "V-SHARP" else f" {background}")
    series_uid = result_series_uid(study_uid, source_series, kind, algorithm_version)
    when = content_datetime or _dt.datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")

    slope = choose_slope(chi)
    stored = np.where(np.isfinite(chi), chi, 0.0) / slope
    stored = np.clip(np.rint(stored), -_INT16_MAX - 1, _INT16_MAX).astype(np.int16)

    base = pydicom.Dataset()
    for kw in _TYPE2_EMPTY:
        setattr(base, kw, None if kw in ("EchoTrainLength", "RepetitionTime") else "")
    if src is not None:
        for kw in _COPIED:
            if kw in src and src[kw].value not in (None, ""):
                base[kw] = src[kw]
    for kw, value in gre.patient.items():
        if kw in _COPIED and value and kw not in base:
            setattr(base, kw, value)
    if "SpecificCharacterSet" not in base:
        base.SpecificCharacterSet = "ISO_IR 100"
    base.StudyInstanceUID = study_uid
    base.FrameOfReferenceUID = for_uid
    base.SOPClassUID = MRImageStorage
    base.Modality = "MR"
    base.SeriesInstanceUID = series_uid
    base.SeriesNumber = int(series_number)
    base.SeriesDescription = f"QSM {method} (ppb)"
    base.SeriesDate, base.SeriesTime = date, time
    base.ContentDate, base.ContentTime = date, time
    base.InstanceCreationDate, base.InstanceCreationTime = date, time
    # General Equipment: our software made these pixels
    base.Manufacturer = MANUFACTURER
    base.ManufacturerModelName = MODEL_NAME
    base.SoftwareVersions = str(algorithm_version)
    # General Image / MR Image
    base.ImageType = IMAGE_TYPE
    base.BurnedInAnnotation = "NO"
    base.LossyImageCompression = "00"
    base.EchoTime = None  # type 2: the map combines every echo
    for kw, default in (("ScanningSequence", "GR"), ("SequenceVariant", "NONE"), ("MRAcquisitionType", "3D")):
        if kw not in base:
            setattr(base, kw, default)
    base.DerivationDescription = (
        f"Quantitative susceptibility map (pixel values in ppb) by {method} after {background} background "
        f"field removal, {MANUFACTURER} {algorithm_version}, "
        f"from GRE magnitude series {gre.magnitude_series_uid or source_series}"
        + (f" and phase series {gre.phase_series_uid}" if gre.phase_series_uid else "")
        + f"; {gre.n_echoes} echo(es)"
    )[:1024]
    # Image plane
    base.ImageOrientationPatient = [_ds_str(v) for v in g.image_orientation()]
    base.PixelSpacing = [_ds_str(v) for v in g.pixel_spacing()]
    if "SliceThickness" not in base:
        base.SliceThickness = _ds_str(g.spacing[2])
    base.SpacingBetweenSlices = _ds_str(g.spacing[2])
    # Image pixel + rescale + VOI
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = int(g.shape[1])
    base.Columns = int(g.shape[0])
    base.BitsAllocated = 16
    base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1
    base.RescaleIntercept = "0"
    base.RescaleSlope = _ds_str(float(f"{slope * PPB_PER_PPM:.6g}"))
    base.RescaleType = RESCALE_TYPE
    center, width = linear_window(*WINDOW_PPM)
    base.WindowCenter = _ds_str(center)
    base.WindowWidth = _ds_str(width)
    base.WindowCenterWidthExplanation = f"QSM {WINDOW_PPM[0]:+g} to {WINDOW_PPM[1]:+g} ppm"
    base.RealWorldValueMappingSequence = DicomSequence([_ppm_mapping(slope)])

    sources = list(gre.source_datasets)
    per_slice_sources = len(sources) == g.shape[2] and all("SOPInstanceUID" in s for s in sources)
    normal = g.direction[:, 2]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(g.shape[2]):
        ds = pydicom.Dataset()
        ds.update(base)
        ds.SOPInstanceUID = result_instance_uid(series_uid, k)
        ds.InstanceNumber = k + 1
        pos = g.slice_position(k)
        ds.ImagePositionPatient = [_ds_str(v) for v in pos]
        ds.SliceLocation = _ds_str(float(np.dot(pos, normal)))
        refs = [sources[k]] if per_slice_sources else [s for s in sources if "SOPInstanceUID" in s]
        if refs:
            ds.SourceImageSequence = DicomSequence([_source_item(s) for s in refs])
        plane = np.ascontiguousarray(stored[:, :, k].T)  # [i, j] -> DICOM [row, col] = [j, i]
        ds.PixelData = plane.astype("<i2").tobytes()
        ds.file_meta = explicit_le_file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
        path = out_dir / f"QSM_{method}_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ppm_mapping(slope: float) -> pydicom.Dataset:
    """Real World Value Mapping item: stored value * slope = susceptibility in ppm (UCUM)."""
    item = pydicom.Dataset()
    item.RealWorldValueFirstValueMapped = -_INT16_MAX - 1
    item.RealWorldValueLastValueMapped = _INT16_MAX
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = float(slope)
    item.LUTExplanation = "Magnetic susceptibility (QSM)"
    item.LUTLabel = "QSM_PPM"
    unit = pydicom.Dataset()
    unit.CodeValue = "[ppm]"  # UCUM: the bracketed arbitrary unit (as the SR uses, core.report.codes.UNIT_PPM)
    unit.CodingSchemeDesignator = "UCUM"
    unit.CodeMeaning = "parts per million"
    item.MeasurementUnitsCodeSequence = DicomSequence([unit])
    return item


def _source_item(src: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    purpose = pydicom.Dataset()
    purpose.CodeValue = "121322"
    purpose.CodingSchemeDesignator = "DCM"
    purpose.CodeMeaning = "Source image for image processing operation"
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return item


def read_qsm_series(folder: Path, series_instance_uid: str | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a QSM series written by :func:`write_qsm_series` (or any single-component MR stack).

    Args:
        folder: folder holding the series (any layout; other series may be present).
        series_instance_uid: which series to read; if ``None`` the folder must hold exactly one
            series whose ImageType value 3 is ``QSM``.

    Returns:
        ``(chi_ppm, geometry)``: float64 ``[i, j, k]`` in ppm (see :func:`qsm_from_frames`) and
        the grid, with its FrameOfReferenceUID.
    """
    scan = scan_folder(Path(folder))
    frames: list[Frame] = []
    for ds in scan.datasets:
        frames.extend(frames_from_dataset(ds))
    if series_instance_uid is None:
        frames = [f for f in frames if len(f.image_type) > 2 and f.image_type[2] == "QSM"]
        uids = sorted({f.series_instance_uid for f in frames})
        if len(uids) != 1:
            raise DicomInputError(
                f"expected one QSM series in {folder}, found {len(uids)}: pass the SeriesInstanceUID to choose"
            )
    else:
        frames = [f for f in frames if f.series_instance_uid == series_instance_uid]
        if not frames:
            raise DicomInputError(f"series {series_instance_uid} not found in {folder}")
    return qsm_from_frames(frames)


def qsm_from_frames(frames: list[Frame]) -> tuple[np.ndarray, Geometry]:
    """``(chi_ppm, geometry)`` of the frames of one single-component stack (a QSM series): sorted by
    position, grid checked as for any input stack, RescaleSlope/Intercept applied; a Modality LUT in
    ppb (RescaleType ``PPB``, this writer's) is divided by 1000, any other is taken as ppm."""
    f0 = frames[0]
    for f in frames:
        if (f.rows, f.columns) != (f0.rows, f0.columns) or not np.allclose(f.orientation, f0.orientation, atol=1e-4):
            raise DicomInputError(f"series {f0.series_instance_uid} mixes image sizes or orientations")
    ordered = sorted(frames, key=lambda f: f.slice_location())
    stack = _Stack(ordered, [_Echo(0.0, None, ordered)])
    _check_grid(stack)  # evenly spaced, no gap, no shear, no duplicates: raises DicomInputError
    chi = _stack_values(stack)[0]
    units = {(f.rescale_type or "").strip().upper() for f in ordered}
    if "PPB" in units:
        if len(units) != 1:
            raise DicomInputError(f"series {f0.series_instance_uid} mixes RescaleType PPB with others")
        chi = chi / PPB_PER_PPM
    locs = np.array([f.slice_location() for f in ordered])
    geometry = Geometry.from_dicom(
        rows=f0.rows,
        columns=f0.columns,
        image_orientation=f0.orientation,
        first_position=ordered[0].position,
        pixel_spacing=f0.pixel_spacing,
        slice_spacing_mm=float(np.mean(np.diff(locs))),
        n_slices=len(ordered),
        frame_of_reference_uid=f0.frame_of_reference_uid,
    )
    return chi, geometry
