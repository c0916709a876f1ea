"""Scanner-like DICOM for a simulated GRE study: classic MR Image Storage, one file per slice per echo.

The simulator writes what the product must read in a hospital, in three vendors' conventions
(see /work/shared/REFERENCES.md, "Vendor phase in DICOM"):

``siemens``
    Two series: magnitude (ImageType ``ORIGINAL\\PRIMARY\\M\\ND``) and phase
    (``ORIGINAL\\PRIMARY\\P\\ND``), all echoes of one kind in one series, told apart by EchoTime and
    EchoNumbers (``omit_echo_numbers=True`` leaves EchoNumbers out, as XA classic exports do).
    Phase is stored uint16 0..4095 with RescaleSlope 2, RescaleIntercept -4096, so that
    ``rescaled * pi / 4096`` is the phase in radians. Magnitude is uint16 scaled to the 12-bit range.
``philips``
    One series holding magnitude (``ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE``) and phase
    (``ORIGINAL\\PRIMARY\\PHASE MAP\\P\\FFE``). Stored values are 12-bit; RescaleSlope/Intercept give
    the phase in radians (``philips_phase_units="rad"``, RescaleType ``rad`` written) or in
    milliradians (``"mrad"``, RescaleType deliberately omitted, as on systems where only the value
    range tells the unit). Magnitude also goes through RescaleSlope.
``ge``
    One series holding real and imaginary images (int16, ImageType ``ORIGINAL\\PRIMARY\\OTHER``); the
    GE private tag (0043,102F) under private creator ``GEMS_PARM_01`` says which: 2 = real,
    3 = imaginary. The reader takes ``atan2(imag, real)``.

Phase polarity is the product's for every vendor (phase = +field term, :mod:`core.physics`); nothing
is flipped here. UIDs are derived from the subject ID and seed (:func:`deterministic_uid`), so the
same simulated subject always gives byte-identical files. Every file passes ``dciodvfy`` without
errors (tested in ``tests/integration/test_dicom_validity.py``).
"""

from __future__ import annotations

import copy
import datetime as _dt
import uuid
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import MRImageStorage

from core.dicom.derived import explicit_le_file_meta
from core.physics import GAMMA_BAR_HZ_PER_T
from training.sim.study import SimulatedStudy

VENDORS = ("siemens", "philips", "ge")

#: Equipment written per vendor (Manufacturer, ManufacturerModelName, SoftwareVersions, StationName).
EQUIPMENT = {
    "siemens": ("SIEMENS", "Prisma", "syngo MR XA30", "SIMSIEMENS01"),
    "philips": ("Philips Medical Systems", "Ingenia", "5.7.1", "SIMPHILIPS01"),
    "ge": ("GE MEDICAL SYSTEMS", "SIGNA Premier", "30\\LX\\MR Software release:RX30.0", "SIMGE01"),
}

#: Series numbers per vendor and content.
SERIES_NUMBERS = {
    ("siemens", "M"): 5,
    ("siemens", "P"): 6,
    ("philips", "MP"): 501,
    ("ge", "RI"): 7,
}

SERIES_DESCRIPTION = "QSM_GRE_3D_ME"

#: Name-based (version 5) UUIDs under this namespace give the simulator's ``2.25.<int>`` UIDs.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/cmb-node/simulator")


def deterministic_uid(study: SimulatedStudy, *parts: object) -> str:
    """A UID (``2.25.<int>``) that depends only on the subject, the seed and ``parts``.

    Writers call it as ``deterministic_uid(study, vendor, "series", "M")`` and so on; the same
    arguments always give the same UID, different arguments give different UIDs. The integer is a
    name-based (SHA-1, version 5) UUID, the form PS3.5 section B.2 allows under the ``2.25`` root.
    (``pydicom.uid.generate_uid(prefix=None, ...)`` ignores its entropy sources and is random.)
    """
    name = "|".join([str(study.subject_id), str(int(study.seed))] + [str(p) for p in parts])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _study_datetime(study: SimulatedStudy) -> _dt.datetime:
    """A fixed, seed-dependent study date/time (2024-2025, working hours)."""
    rng = np.random.default_rng([int(study.seed) & 0xFFFFFFFF, 7])
    day = _dt.date(2024, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 700)))
    seconds = int(rng.integers(8 * 3600, 18 * 3600))
    return _dt.datetime.combine(day, _dt.time()) + _dt.timedelta(seconds=seconds)


def _default_patient(study: SimulatedStudy) -> dict:
    rng = np.random.default_rng([int(study.seed) & 0xFFFFFFFF, 11])
    when = _study_datetime(study)
    age = int(rng.integers(45, 90))
    birth = _dt.date(when.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    if (birth.month, birth.day) > (when.month, when.day):
        age -= 1
    return {
        "PatientName": f"SIM^{study.subject_id}",
        "PatientID": str(study.subject_id),
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": "F" if rng.random() < 0.5 else "M",
        "PatientAge": f"{age:03d}Y",
    }


def common_attributes(
    study: SimulatedStudy, vendor: str, patient: dict | None = None
) -> pydicom.Dataset:
    """Attributes shared by every instance of a simulated study, for classic and Enhanced MR writers.

    The returned dataset holds, and only holds, attributes that are the same for every instance of
    the study whatever its storage class:

    * Patient module: PatientName (``SIM^<subject_id>``), PatientID (subject_id), PatientBirthDate,
      PatientSex; Patient Study: PatientAge (all deterministic from the seed).
    * General Study: StudyInstanceUID, StudyDate, StudyTime, StudyID, AccessionNumber,
      ReferringPhysicianName (empty), StudyDescription.
    * Frame of Reference: FrameOfReferenceUID (``study.geometry.frame_of_reference_uid`` when set,
      else derived from the seed), PositionReferenceIndicator (empty).
    * General Equipment: Manufacturer, ManufacturerModelName, SoftwareVersions, StationName,
      InstitutionName, DeviceSerialNumber (per ``vendor``, see :data:`EQUIPMENT`).
    * Series-level constants: Modality ``MR``, BodyPartExamined ``HEAD``, PatientPosition ``HFS``.
    * SpecificCharacterSet ``ISO_IR 100``.

    Acquisition parameters (EchoTime, FlipAngle, ...) are *not* included: classic MR puts them on
    the image, Enhanced MR in functional groups, so each writer sets its own from
    ``study.acquisition``. Series and SOP Instance UIDs are not included either; derive them with
    :func:`deterministic_uid` (e.g. ``deterministic_uid(study, vendor, "enhanced", "series")``) so
    they are reproducible too.

    Args:
        study: the simulated subject.
        vendor: ``"siemens"``, ``"philips"`` or ``"ge"``.
        patient: optional overrides, DICOM keywords to values (e.g. ``{"PatientID": "X1"}``);
            any standard keyword is accepted and set on the returned dataset.

    Returns:
        A new :class:`pydicom.Dataset`; copy it (``copy.deepcopy``) before changing it per instance.
    """
    vendor = _check_vendor(vendor)
    when = _study_datetime(study)
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    for key, value in _default_patient(study).items():
        setattr(ds, key, value)
    ds.StudyInstanceUID = deterministic_uid(study, "study")
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.StudyID = f"{int(study.seed) % 100000:d}"
    ds.AccessionNumber = f"SIM{int(study.seed) % 10**8:08d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "MR BRAIN SWI/QSM (simulated)"
    ds.FrameOfReferenceUID = study.geometry.frame_of_reference_uid or deterministic_uid(study, "for")
    ds.PositionReferenceIndicator = ""
    manufacturer, model, software, station = EQUIPMENT[vendor]
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.SoftwareVersions = software
    ds.StationName = station
    ds.InstitutionName = "Simulated Hospital"
    ds.DeviceSerialNumber = f"SIM-{vendor.upper()}-0001"
    ds.Modality = "MR"
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    for key, value in (patient or {}).items():
        if pydicom.datadict.tag_for_keyword(key) is None:
            raise ValueError(f"patient override {key!r} is not a DICOM keyword")
        setattr(ds, key, value)
    return ds


def write_study(
    study: SimulatedStudy,
    out_dir: Path,
    vendor: str = "siemens",
    *,
    philips_phase_units: str = "rad",
    omit_echo_numbers: bool = False,
    patient: dict | None = None,
    enhanced: bool = False,
) -> list[Path]:
    """Write a simulated study as scanner-like DICOM files under ``out_dir``.

    Args:
        study: magnitude and wrapped phase ``[echo, i, j, k]`` on ``study.geometry``.
        out_dir: created if needed; files go to ``out_dir/S<series>/I<instance>.dcm``.
        vendor: ``"siemens"``, ``"philips"`` or ``"ge"`` (conventions in the module docstring).
        philips_phase_units: ``"rad"`` or ``"mrad"``: the unit of Philips' rescaled phase.
        omit_echo_numbers: leave EchoNumbers out (echoes then only differ by EchoTime).
        patient: overrides of patient/study attributes (see :func:`common_attributes`).
        enhanced: write Enhanced MR Image Storage (one multi-frame instance per series) through
            :func:`training.sim.enhanced_writer.write_enhanced_study` instead.

    Returns:
        The written paths, in writing order.
    """
    vendor = _check_vendor(vendor)
    if philips_phase_units not in ("rad", "mrad"):
        raise ValueError(f"philips_phase_units must be 'rad' or 'mrad', got {philips_phase_units!r}")
    mag = np.asarray(study.magnitude, dtype=np.float64)
    phase = np.asarray(study.phase_rad, dtype=np.float64)
    if mag.ndim != 4 or phase.shape != mag.shape or mag.shape[1:] != tuple(study.geometry.shape):
        raise ValueError(
            f"magnitude {mag.shape} and phase {phase.shape} must be [echo, i, j, k] on the geometry "
            f"{study.geometry.shape}"
        )
    if len(study.acquisition.echo_times_s) != mag.shape[0]:
        raise ValueError("one echo time per echo is required")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = common_attributes(study, vendor, patient)
    if enhanced:
        from training.sim.enhanced_writer import write_enhanced_study  # written separately

        return write_enhanced_study(study, out_dir, vendor, common)

    # wrapped to [-pi, pi) whatever the caller gave
    phase = np.mod(phase + np.pi, 2 * np.pi) - np.pi
    if vendor == "siemens":
        return _write_siemens(study, out_dir, common, mag, phase, omit_echo_numbers)
    if vendor == "philips":
        return _write_philips(study, out_dir, common, mag, phase, philips_phase_units, omit_echo_numbers)
    return _write_ge(study, out_dir, common, mag, phase, omit_echo_numbers)


# ---------------------------------------------------------------------------------- helpers
def _check_vendor(vendor: str) -> str:
    v = str(vendor).lower()
    if v not in VENDORS:
        raise ValueError(f"vendor must be one of {VENDORS}, got {vendor!r}")
    return v


def _ds_str(value: float, digits: int = 6) -> str:
    """A DS string of at most 16 characters."""
    s = f"{value:.{digits}g}"
    while len(s) > 16 and digits > 1:
        digits -= 1
        s = f"{value:.{digits}g}"
    return s


def _series_dataset(
    study: SimulatedStudy,
    common: pydicom.Dataset,
    vendor: str,
    series_key: str,
    series_number: int,
    description: str,
) -> pydicom.Dataset:
    """Attributes common to every image of one series (study, series, equipment, acquisition)."""
    g = study.geometry
    acq = study.acquisition
    when = _study_datetime(study) + _dt.timedelta(minutes=5)
    ds = copy.deepcopy(common)
    ds.SOPClassUID = MRImageStorage
    ds.SeriesInstanceUID = deterministic_uid(study, vendor, "series", series_key)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.AcquisitionDate = ds.SeriesDate
    ds.AcquisitionTime = when.strftime("%H%M%S")
    ds.ContentDate = ds.SeriesDate
    ds.ContentTime = ds.SeriesTime
    ds.InstanceCreationDate = ds.SeriesDate
    ds.InstanceCreationTime = ds.SeriesTime
    ds.AcquisitionNumber = 1
    # Image plane (per image: ImagePositionPatient, SliceLocation)
    ds.ImageOrientationPatient = [_ds_str(v, 8) for v in g.image_orientation()]
    ds.PixelSpacing = [_ds_str(v, 8) for v in g.pixel_spacing()]
    ds.SliceThickness = _ds_str(g.spacing[2], 8)
    ds.SpacingBetweenSlices = _ds_str(g.spacing[2], 8)
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(g.shape[1])
    ds.Columns = int(g.shape[0])
    ds.BitsAllocated = 16
    # MR image
    ds.ScanningSequence = "GR"
    ds.SequenceVariant = ["SP"] if vendor != "philips" else ["SP", "SS"]
    ds.SequenceName = {"siemens": "*fl3d3_ns", "philips": "T1FFE", "ge": "3D_MEGRE"}[vendor]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "3D"
    ds.RepetitionTime = _ds_str(acq.repetition_time_s * 1e3)
    ds.EchoTrainLength = len(acq.echo_times_s)
    # slice locations of the acquisition, as GE and Siemens write it (the node's early start reads
    # it with EchoTrainLength: deploy/node/completeness.py)
    ds.ImagesInAcquisition = int(g.shape[2])
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _ds_str(GAMMA_BAR_HZ_PER_T * acq.field_strength_t / 1e6, 9)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds_str(acq.field_strength_t)
    ds.FlipAngle = _ds_str(acq.flip_angle_deg)
    ds.PixelBandwidth = "260"
    ds.ReceiveCoilName = {"siemens": "HeadNeck_64", "philips": "dS Head 32ch", "ge": "48HN"}[vendor]
    ds.TransmitCoilName = "Body"
    # phase encoding along the column direction (j: anterior-posterior for axial slices);
    # AcquisitionMatrix is frequency rows \ frequency columns \ phase rows \ phase columns
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.AcquisitionMatrix = [int(g.shape[0]), 0, 0, int(g.shape[1])]
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = _ds_str(100.0 * g.shape[1] * g.spacing[1] / (g.shape[0] * g.spacing[0]))
    ds.VariableFlipAngleFlag = "N"
    ds.dBdt = "0"
    ds.SAR = "0.1"
    ds.PatientWeight = "70"
    ds.PatientSize = "1.7"
    return ds


def _image(
    series: pydicom.Dataset,
    study: SimulatedStudy,
    vendor: str,
    kind: str,
    echo: int,
    k: int,
    instance: int,
    pixels: np.ndarray,
    *,
    signed: bool,
    bits_stored: int,
    image_type: list[str],
    slope: float | None,
    intercept: float | None,
    rescale_type: str | None,
    window: tuple[float, float],
    omit_echo_numbers: bool,
) -> pydicom.Dataset:
    """One classic MR image: the series attributes plus slice/echo specific ones and pixel data."""
    g = study.geometry
    # shallow: the series' elements are shared, never modified; every attribute set below is new
    ds = pydicom.Dataset()
    ds.update(series)
    ds.SOPInstanceUID = deterministic_uid(study, vendor, "instance", kind, echo, k)
    ds.InstanceNumber = instance
    ds.ImageType = image_type
    pos = g.slice_position(k)
    normal = g.direction[:, 2]
    ds.ImagePositionPatient = [_ds_str(v, 10) for v in pos]
    ds.SliceLocation = _ds_str(float(np.dot(pos, normal)), 10)
    ds.EchoTime = _ds_str(study.acquisition.echo_times_s[echo] * 1e3, 8)
    if not omit_echo_numbers:
        ds.EchoNumbers = echo + 1
    ds.TemporalPositionIdentifier = 1
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleIntercept = _ds_str(intercept, 12)
        ds.RescaleSlope = _ds_str(slope, 12)
    if rescale_type is not None:
        ds.RescaleType = rescale_type
    ds.WindowCenter = _ds_str(window[0])
    ds.WindowWidth = _ds_str(window[1])
    # pixel_array is [row, col] = [j, i]: transpose the [i, j] slice
    plane = np.ascontiguousarray(pixels.T)
    ds.PixelData = plane.astype("<i2" if signed else "<u2").tobytes()
    return ds


def _save(ds: pydicom.Dataset, out_dir: Path) -> Path:
    ds.file_meta = explicit_le_file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
    folder = out_dir / f"S{int(ds.SeriesNumber):04d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"I{int(ds.InstanceNumber):05d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _quantise_magnitude(mag: np.ndarray, max_stored: int) -> tuple[np.ndarray, float]:
    """Stored integers for a magnitude stack and the slope that maps them back."""
    top = float(np.max(mag)) if mag.size else 0.0
    scale = max_stored / top if top > 0 else 1.0
    stored = np.clip(np.rint(np.clip(mag, 0, None) * scale), 0, max_stored)
    return stored.astype(np.int64), 1.0 / scale


def _write_siemens(study, out_dir, common, mag, phase, omit) -> list[Path]:
    n_e, _, _, n_k = mag.shape
    paths: list[Path] = []
    mag_stored, _ = _quantise_magnitude(mag, 4095)
    # rescaled = 2*stored - 4096 in [-4096, 4094]; radians = rescaled * pi / 4096
    ph_stored = np.mod(np.rint(phase * 2048.0 / np.pi + 2048.0), 4096).astype(np.int64)
    for kind, stored, itype, slope, intercept, window in (
        ("M", mag_stored, ["ORIGINAL", "PRIMARY", "M", "ND"], None, None, (1024.0, 2048.0)),
        ("P", ph_stored, ["ORIGINAL", "PRIMARY", "P", "ND"], 2.0, -4096.0, (0.0, 8192.0)),
    ):
        desc = SERIES_DESCRIPTION if kind == "M" else SERIES_DESCRIPTION + "_PHA"
        series = _series_dataset(study, common, "siemens", kind, SERIES_NUMBERS[("siemens", kind)], desc)
        for k in range(n_k):
            for e in range(n_e):
                ds = _image(
                    series, study, "siemens", kind, e, k, k * n_e + e + 1, stored[e, :, :, k],
                    signed=False, bits_stored=12, image_type=itype, slope=slope, intercept=intercept,
                    rescale_type="US" if slope is not None else None, window=window, omit_echo_numbers=omit,
                )
                paths.append(_save(ds, out_dir))
    return paths


def _write_philips(study, out_dir, common, mag, phase, units, omit) -> list[Path]:
    n_e, _, _, n_k = mag.shape
    paths: list[Path] = []
    mag_stored, mag_slope = _quantise_magnitude(mag, 4095)
    # rescaled = stored * 2pi/4095 - pi  (rad)  or  * 1000  (mrad)
    factor = 1000.0 if units == "mrad" else 1.0
    ph_slope = 2.0 * np.pi / 4095.0 * factor
    ph_intercept = -np.pi * factor
    ph_stored = np.clip(np.rint((phase + np.pi) * 4095.0 / (2.0 * np.pi)), 0, 4095).astype(np.int64)
    series = _series_dataset(study, common, "philips", "MP", SERIES_NUMBERS[("philips", "MP")], SERIES_DESCRIPTION)
    instance = 0
    # Philips orders a mixed series by slice, then echo, then image type
    for k in range(n_k):
        for e in range(n_e):
            for kind in ("M", "P"):
                instance += 1
                if kind == "M":
                    ds = _image(
                        series, study, "philips", "M", e, k, instance, mag_stored[e, :, :, k],
                        signed=False, bits_stored=12, image_type=["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"],
                        slope=mag_slope, intercept=0.0, rescale_type="normalized",
                        window=(2048 * mag_slope, 4096 * mag_slope), omit_echo_numbers=omit,
                    )
                else:
                    ds = _image(
                        series, study, "philips", "P", e, k, instance, ph_stored[e, :, :, k],
                        signed=False, bits_stored=12,
                        image_type=["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"],
                        slope=ph_slope, intercept=ph_intercept,
                        rescale_type="rad" if units == "rad" else None,
                        window=(0.0, 2 * np.pi * factor), omit_echo_numbers=omit,
                    )
                paths.append(_save(ds, out_dir))
    return paths


def _write_ge(study, out_dir, common, mag, phase, omit) -> list[Path]:
    n_e, _, _, n_k = mag.shape
    paths: list[Path] = []
    top = float(np.max(mag)) if mag.size else 0.0
    scale = 32000.0 / top if top > 0 else 1.0
    real = np.clip(np.rint(mag * np.cos(phase) * scale), -32768, 32767).astype(np.int64)
    imag = np.clip(np.rint(mag * np.sin(phase) * scale), -32768, 32767).astype(np.int64)
    series = _series_dataset(study, common, "ge", "RI", SERIES_NUMBERS[("ge", "RI")], SERIES_DESCRIPTION)
    instance = 0
    for kind, stored, code in (("R", real, 2), ("I", imag, 3)):
        for e in range(n_e):
            for k in range(n_k):
                instance += 1
                ds = _image(
                    series, study, "ge", kind, e, k, instance, stored[e, :, :, k],
                    signed=True, bits_stored=16, image_type=["ORIGINAL", "PRIMARY", "OTHER"],
                    slope=None, intercept=None, rescale_type=None, window=(0.0, 32000.0), omit_echo_numbers=omit,
                )
                block = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
                block.add_new(0x2F, "SS", code)
                paths.append(_save(ds, out_dir))
    return paths
