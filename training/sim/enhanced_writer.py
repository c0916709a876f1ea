"""Write a simulated multi-echo GRE study as Enhanced MR Image Storage (multi-frame) instances.

Newer scanners (Siemens XA, Philips from R5) send one multi-frame object per reconstructed image
type instead of one classic instance per slice and echo. This module writes the simulator's
:class:`~training.sim.study.SimulatedStudy` in that form so the loader's Enhanced MR path
(:func:`core.dicom.enhanced.frames_from_enhanced`) is exercised on known truth:

* ``vendor="siemens"`` or ``"philips"``: one instance holding the magnitude and one holding the
  phase, every slice x echo a frame (echo-major frame order: frame ``e * n_slices + k + 1``);
* ``vendor="ge"``: one real and one imaginary instance instead (``M cos phi``, ``M sin phi``).

Pixel value conventions (Pixel Value Transformation functional group, rescaled = stored * slope +
intercept):

* Siemens phase: stored 0..4095, slope 2, intercept -4096 -> rescaled in [-4096, 4094], and
  radians = rescaled * pi / 4096 (the XA convention, identical to the classic one).
* Philips phase: stored 0..4095, slope 2 pi / 4096, intercept -pi -> rescaled value in radians.
* Magnitude: stored 0..4095 with slope max / 4095 (arbitrary units, the simulated values back).
* GE real / imaginary: signed 16-bit, one common slope for both so ``atan2`` gives the phase.

Phase polarity is the product's (DESIGN.md section 4: phase = +field term); nothing is flipped.
Every instance is meant to pass ``dciodvfy`` (dicom3tools) without errors; the unit test checks it.
UIDs are deterministic: ``generate_uid(entropy_srcs=[subject_id, seed, vendor, ...])``, so writing
the same study twice gives the same objects.
"""

from __future__ import annotations

import copy
import datetime as _dt
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pydicom.valuerep import DSfloat

from core.dicom.derived import explicit_le_file_meta
from training.sim.study import SimulatedStudy

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

#: Manufacturer-facing strings per simulated vendor (clearly marked as simulated in ImageComments).
_VENDORS: dict[str, dict[str, str]] = {
    "siemens": {
        "manufacturer": "SIEMENS",
        "model": "MAGNETOM Vida",
        "software": "syngo MR XA50",
        "sequence": "*swi3d4r",
        "coil": "HeadNeck_64",
        "coil_manufacturer": "SIEMENS",
        "body_coil": "Body",
    },
    "philips": {
        "manufacturer": "Philips",
        "model": "Ingenia Elition X",
        "software": "5.7.1",
        "sequence": "FFE",
        "coil": "DS_HeadNeck",
        "coil_manufacturer": "Philips",
        "body_coil": "B",
    },
    "ge": {
        "manufacturer": "GE MEDICAL SYSTEMS",
        "model": "SIGNA Premier",
        "software": "MR30.1",
        "sequence": "SWAN",
        "coil": "48HN",
        "coil_manufacturer": "GE",
        "body_coil": "BODY",
    },
}

#: Components written per vendor: (role, ComplexImageComponent, FrameType value 3).
_COMPONENTS: dict[str, list[tuple[str, str, str]]] = {
    "siemens": [("magnitude", "MAGNITUDE", "M"), ("phase", "PHASE", "P")],
    "philips": [("magnitude", "MAGNITUDE", "T2_STAR"), ("phase", "PHASE", "T2_STAR")],
    "ge": [("real", "REAL", "T2_STAR"), ("imaginary", "IMAGINARY", "T2_STAR")],
}

#: Attributes that belong to one instance / series / image and are never taken from ``common``.
_NOT_FROM_COMMON = {
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription",
    "InstanceNumber", "ImageType", "ComplexImageComponent", "AcquisitionContrast", "Modality",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PixelData", "NumberOfFrames",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    "DimensionOrganizationSequence", "DimensionIndexSequence", "DimensionOrganizationType",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "EchoTime", "EchoNumbers",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "SliceLocation", "WindowCenter", "WindowWidth", "ImageComments", "PixelPresentation",
    "VolumetricProperties", "VolumeBasedCalculationTechnique", "PresentationLUTShape",
}

_SIEMENS_PHASE = (2.0, -4096.0)  # slope, intercept; radians = rescaled * pi / 4096
_PHILIPS_PHASE = (2.0 * np.pi / 4096.0, -np.pi)  # rescaled value is radians


def write_enhanced_study(
    study: SimulatedStudy,
    out_dir: Path,
    vendor: str,
    common: pydicom.Dataset | None = None,
) -> list[Path]:
    """Write ``study`` as two Enhanced MR Image Storage instances and return their paths.

    Args:
        study: the simulated subject (``magnitude`` / ``phase_rad`` ``[echo, i, j, k]``).
        out_dir: folder to write into (created if missing).
        vendor: ``"siemens"`` or ``"philips"`` (magnitude + phase) or ``"ge"`` (real + imaginary).
        common: optional patient / study / equipment attributes (e.g. from the classic writer);
            its elements replace this module's defaults, except per-instance and pixel-module
            attributes (see ``_NOT_FROM_COMMON``) and empty values that would replace a type 1 one.

    Returns:
        The written files, in component order (magnitude, phase) or (real, imaginary).
    """
    vendor = vendor.lower()
    if vendor not in _VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; expected one of {sorted(_VENDORS)}")
    mag = np.asarray(study.magnitude, dtype=np.float64)
    phase = np.asarray(study.phase_rad, dtype=np.float64)
    if mag.ndim != 4 or mag.shape != phase.shape:
        raise ValueError(f"magnitude {mag.shape} and phase {phase.shape} must both be [echo, i, j, k]")
    if mag.shape[1:] != tuple(study.geometry.shape):
        raise ValueError(f"array shape {mag.shape[1:]} does not match geometry {study.geometry.shape}")
    tes = [float(t) for t in study.acquisition.echo_times_s]
    if len(tes) != mag.shape[0]:
        raise ValueError(f"{len(tes)} echo times for {mag.shape[0]} echoes")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(study, vendor)
    stored = _stored_components(mag, phase, vendor)
    paths = []
    for index, (role, cic, flavour) in enumerate(_COMPONENTS[vendor]):
        pixels, bits, signed, slope, intercept = stored[role]
        ds = _instance(study, vendor, base, role, cic, flavour, index, pixels, bits, signed,
                       slope, intercept)
        if common is not None:
            _merge_common(ds, common)
        path = out_dir / f"enhanced_{vendor}_{role}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------- pixel values
def _stored_components(mag: np.ndarray, phase: np.ndarray, vendor: str) -> dict:
    """Quantise the float arrays to stored integers: role -> (array, bits, signed, slope, icpt)."""
    out = {}
    if vendor == "ge":
        real = mag * np.cos(phase)
        imag = mag * np.sin(phase)
        peak = max(float(np.abs(real).max()), float(np.abs(imag).max()), 1e-12)
        slope = peak / 32000.0
        for role, arr in (("real", real), ("imaginary", imag)):
            q = np.clip(np.rint(arr / slope), -32768, 32767).astype(np.int16)
            out[role] = (q, 16, True, slope, 0.0)
        return out
    peak = max(float(mag.max()), 1e-12)
    slope = peak / 4095.0
    q = np.clip(np.rint(mag / slope), 0, 4095).astype(np.uint16)
    out["magnitude"] = (q, 12, False, slope, 0.0)
    p_slope, p_intercept = _SIEMENS_PHASE if vendor == "siemens" else _PHILIPS_PHASE
    if vendor == "siemens":
        # rescaled = phase * 4096 / pi in [-4096, 4096); stored = (rescaled + 4096) / 2
        s = np.rint(phase * 2048.0 / np.pi + 2048.0)
    else:
        s = np.rint((phase - p_intercept) / p_slope)
    # +pi and -pi are one phase: a value rounding to 4096 wraps to 0
    q = np.mod(s, 4096).astype(np.uint16)
    out["phase"] = (q, 12, False, p_slope, p_intercept)
    return out


# ---------------------------------------------------------------------------------- datasets
def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _code(value: str, scheme: str, meaning: str) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _uid(study: SimulatedStudy, vendor: str, *parts: str) -> str:
    return generate_uid(entropy_srcs=[study.subject_id, str(study.seed), vendor, "enhanced", *parts])


def _study_datetime(study: SimulatedStudy) -> _dt.datetime:
    """A deterministic acquisition time derived from the seed (no wall clock in the output)."""
    return _dt.datetime(2025, 1, 1, 8, 0, 0) + _dt.timedelta(days=study.seed % 365,
                                                               minutes=(study.seed * 7) % 480)


def _base_dataset(study: SimulatedStudy, vendor: str) -> pydicom.Dataset:
    """Patient, study, frame of reference and equipment attributes shared by both instances."""
    v = _VENDORS[vendor]
    when = _study_datetime(study)
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    # Patient
    ds.PatientName = f"SIM^{study.subject_id}"
    ds.PatientID = f"SIM-{study.subject_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = _uid(study, vendor, "study")
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.StudyDescription = "SIMULATED brain GRE"
    # Frame of Reference
    ds.FrameOfReferenceUID = study.geometry.frame_of_reference_uid or _uid(study, vendor, "for")
    ds.PositionReferenceIndicator = ""
    # General / Enhanced General Equipment
    ds.Manufacturer = v["manufacturer"]
    ds.ManufacturerModelName = v["model"]
    ds.DeviceSerialNumber = "SIM0001"
    ds.SoftwareVersions = v["software"]
    ds.InstitutionName = "Simulator"
    ds.StationName = "SIMMR"
    return ds


def _merge_common(ds: pydicom.Dataset, common: pydicom.Dataset) -> None:
    """Copy ``common``'s elements over ``ds`` (deep copies: ``common`` is never modified)."""
    for elem in common:
        if elem.tag.group == 0x0002 or elem.keyword in _NOT_FROM_COMMON or elem.tag.is_private:
            continue
        empty = elem.value is None or elem.value == "" or (elem.VR == "SQ" and len(elem.value) == 0)
        if empty and elem.keyword in ds and ds[elem.keyword].value not in (None, ""):
            continue  # keep a type 1 value rather than blanking it
        ds[elem.tag] = copy.deepcopy(elem)


def _instance(
    study: SimulatedStudy,
    vendor: str,
    base: pydicom.Dataset,
    role: str,
    cic: str,
    flavour: str,
    index: int,
    pixels: np.ndarray,
    bits: int,
    signed: bool,
    slope: float,
    intercept: float,
) -> pydicom.Dataset:
    """One multi-frame instance for one complex component (all echoes x slices)."""
    v = _VENDORS[vendor]
    acq = study.acquisition
    n_echo, ni, nj, nk = pixels.shape
    tes_ms = [float(t) * 1e3 for t in acq.echo_times_s]
    when = _study_datetime(study)
    # a 3-D scan: every partition (frame) comes from the whole k-space, acquired over
    # TR * phase-encoding steps * partitions
    duration_s = acq.repetition_time_s * nj * nk
    frame_type = ["ORIGINAL", "PRIMARY", flavour, "NONE"]

    ds = copy.deepcopy(base)
    sop_uid = _uid(study, vendor, role, "instance")
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    # General Series / MR Series
    ds.Modality = "MR"
    ds.SeriesInstanceUID = _uid(study, vendor, role, "series")
    ds.SeriesNumber = 10 + index
    ds.SeriesDescription = f"SIM {v['sequence']} {role}"
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "HEAD"
    # Multi-frame Functional Groups / Enhanced MR Image
    ds.InstanceNumber = 1
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionNumber = 1
    ds.AcquisitionDateTime = when.strftime("%Y%m%d%H%M%S.000000")
    ds.AcquisitionDuration = round(float(duration_s), 6)
    ds.ImageType = frame_type
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = cic
    ds.AcquisitionContrast = "T2_STAR"
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = _ds(acq.field_strength_t)
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImageComments = "Simulated by training.sim (not a patient acquisition)"
    # MR Pulse Sequence
    ds.PulseSequenceName = v["sequence"]
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.SegmentedKSpaceTraversal = "SINGLE"
    ds.CoverageOfKSpace = "FULL"
    ds.NumberOfKSpaceTrajectories = 1
    # Acquisition Context (type 2, empty)
    ds.AcquisitionContextSequence = Sequence()
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.NumberOfFrames = n_echo * nk
    # frames echo-major; each frame [row, col] = [j, i]
    frames = np.ascontiguousarray(np.transpose(pixels, (0, 3, 2, 1)).reshape(n_echo * nk, nj, ni))
    ds.PixelData = frames.astype("<i2" if signed else "<u2").tobytes()

    # Multi-frame Dimension: stack, position in stack, echo
    dim_org_uid = _uid(study, vendor, "dimension-organization")
    org = pydicom.Dataset()
    org.DimensionOrganizationUID = dim_org_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    ds.DimensionOrganizationType = "3D"
    dims = []
    for pointer, group, label in (
        (0x00209056, 0x00209111, "Stack ID"),
        (0x00209057, 0x00209111, "In-Stack Position Number"),
        (0x00189082, 0x00189114, "Effective Echo Time"),
    ):
        d = pydicom.Dataset()
        d.DimensionOrganizationUID = dim_org_uid
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = group
        d.DimensionDescriptionLabel = label
        dims.append(d)
    ds.DimensionIndexSequence = Sequence(dims)

    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(study, vendor, frame_type, cic,
                                                                 slope, intercept)])
    per_frame = []
    for e in range(n_echo):
        for k in range(nk):
            per_frame.append(_frame_groups(study, e, k, tes_ms[e], when, duration_s))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)

    ds.file_meta = explicit_le_file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    return ds


def _shared_groups(
    study: SimulatedStudy, vendor: str, frame_type: list[str], cic: str, slope: float, intercept: float
) -> pydicom.Dataset:
    """Functional groups identical for every frame of one instance."""
    v = _VENDORS[vendor]
    geom = study.geometry
    acq = study.acquisition
    ni, nj, nk = geom.shape
    si, sj, sk = geom.spacing
    g = pydicom.Dataset()

    pm = pydicom.Dataset()
    pm.PixelSpacing = [_ds(x) for x in geom.pixel_spacing()]
    pm.SliceThickness = _ds(sk)
    pm.SpacingBetweenSlices = _ds(sk)
    g.PixelMeasuresSequence = Sequence([pm])

    po = pydicom.Dataset()
    po.ImageOrientationPatient = [_ds(round(x, 10)) for x in geom.image_orientation()]
    g.PlaneOrientationSequence = Sequence([po])

    fa = pydicom.Dataset()
    fa.AnatomicRegionSequence = Sequence([_code("12738006", "SCT", "Brain")])
    fa.FrameLaterality = "U"
    g.FrameAnatomySequence = Sequence([fa])

    pvt = pydicom.Dataset()
    pvt.RescaleIntercept = _ds(intercept)
    pvt.RescaleSlope = _ds(slope)
    pvt.RescaleType = "US"
    g.PixelValueTransformationSequence = Sequence([pvt])

    ft = pydicom.Dataset()
    ft.FrameType = frame_type
    ft.PixelPresentation = "MONOCHROME"
    ft.VolumetricProperties = "VOLUME"
    ft.VolumeBasedCalculationTechnique = "NONE"
    ft.ComplexImageComponent = cic
    ft.AcquisitionContrast = "T2_STAR"
    g.MRImageFrameTypeSequence = Sequence([ft])

    tim = pydicom.Dataset()
    tim.RepetitionTime = float(acq.repetition_time_s * 1e3)
    tim.FlipAngle = float(acq.flip_angle_deg)
    tim.EchoTrainLength = len(acq.echo_times_s)
    tim.RFEchoTrainLength = 0
    tim.GradientEchoTrainLength = len(acq.echo_times_s)
    sar = pydicom.Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.4
    tim.SpecificAbsorptionRateSequence = Sequence([sar])
    tim.GradientOutputType = "DB_DT"
    tim.GradientOutput = 20.0
    modes = []
    for mode_type in ("STATIC FIELD", "RF", "GRADIENT"):
        m = pydicom.Dataset()
        m.OperatingModeType = mode_type
        m.OperatingMode = "IEC_NORMAL"
        modes.append(m)
    tim.OperatingModeSequence = Sequence(modes)
    g.MRTimingAndRelatedParametersSequence = Sequence([tim])

    fov = pydicom.Dataset()
    fov.InPlanePhaseEncodingDirection = "ROW"
    fov.MRAcquisitionFrequencyEncodingSteps = ni
    fov.MRAcquisitionPhaseEncodingStepsInPlane = nj
    fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = nk
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = _ds(100.0 * nj * sj / (ni * si))
    g.MRFOVGeometrySequence = Sequence([fov])

    mod = pydicom.Dataset()
    mod.InversionRecovery = "NO"
    mod.FlowCompensation = "NONE"
    mod.Spoiling = "RF_AND_GRADIENT"
    mod.T2Preparation = "NO"
    mod.SpectrallySelectedExcitation = "NONE"
    mod.SpatialPresaturation = "NONE"
    mod.PartialFourier = "NO"
    mod.ParallelAcquisition = "NO"
    g.MRModifierSequence = Sequence([mod])

    imod = pydicom.Dataset()
    imod.MagnetizationTransfer = "NONE"
    imod.BloodSignalNulling = "NO"
    imod.Tagging = "NONE"
    imod.TransmitterFrequency = round(float(acq.field_strength_t) * 42.576, 6)
    imod.PixelBandwidth = 240.0
    g.MRImagingModifierSequence = Sequence([imod])

    rc = pydicom.Dataset()
    rc.ReceiveCoilName = v["coil"]
    rc.ReceiveCoilManufacturerName = v["coil_manufacturer"]
    rc.ReceiveCoilType = "MULTICOIL"
    rc.QuadratureReceiveCoil = "NO"
    element = pydicom.Dataset()
    element.MultiCoilElementName = "HEA;HEP"
    element.MultiCoilElementUsed = "YES"
    rc.MultiCoilDefinitionSequence = Sequence([element])
    g.MRReceiveCoilSequence = Sequence([rc])

    tc = pydicom.Dataset()
    tc.TransmitCoilName = v["body_coil"]
    tc.TransmitCoilManufacturerName = v["coil_manufacturer"]
    tc.TransmitCoilType = "BODY"
    g.MRTransmitCoilSequence = Sequence([tc])

    av = pydicom.Dataset()
    av.NumberOfAverages = 1.0
    g.MRAveragesSequence = Sequence([av])
    return g


def _frame_groups(
    study: SimulatedStudy, e: int, k: int, te_ms: float, when: _dt.datetime, scan_s: float
) -> pydicom.Dataset:
    """Functional groups that differ per frame: position, frame content, echo time.

    A 3-D acquisition reconstructs every frame from the whole k-space, so each frame's
    acquisition time and duration are those of the scan.
    """
    g = pydicom.Dataset()
    fc = pydicom.Dataset()
    stamp = when.strftime("%Y%m%d%H%M%S.%f")
    fc.FrameAcquisitionNumber = 1
    fc.FrameReferenceDateTime = stamp
    fc.FrameAcquisitionDateTime = stamp
    fc.FrameAcquisitionDuration = round(float(scan_s) * 1e3, 3)
    fc.StackID = "1"
    fc.InStackPositionNumber = k + 1
    fc.DimensionIndexValues = [1, k + 1, e + 1]
    g.FrameContentSequence = Sequence([fc])

    pp = pydicom.Dataset()
    pp.ImagePositionPatient = [_ds(round(float(x), 6)) for x in study.geometry.slice_position(k)]
    g.PlanePositionSequence = Sequence([pp])

    echo = pydicom.Dataset()
    echo.EffectiveEchoTime = float(te_ms)
    g.MREchoSequence = Sequence([echo])
    return g
