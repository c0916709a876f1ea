"""From a folder of scanner DICOM to one :class:`~core.dicom.volume.GREVolume`: series selection,
echo ordering, vendor phase scaling and volume building.

Pipeline::

    load_datasets(folder)          every DICOM file under the folder, any layout
      -> frames_from_dataset(ds)   one Frame per image plane (classic here, Enhanced MR in
                                   core.dicom.enhanced)
      -> select_gre(frames)        stacks (series x component x orientation), pairs magnitude with
                                   phase (or real with imaginary), checks, scales, builds
      -> GREVolume

Selection rules (``select_gre``):

* Frames are grouped into *stacks*: same series, same component (M, P, R, I), same orientation and
  image size. A Philips series holding magnitude and phase gives two stacks; Siemens' two series
  give one each; GE's real/imaginary series gives two.
* Within a stack, echoes are told apart by EchoTime (and EchoNumbers where present) and ordered by
  EchoTime, never by EchoNumbers alone (Siemens XA classic omits EchoNumbers; GE research sequences
  repeat them). Slices are sorted by position along the slice normal; positions must lie on the
  normal (no gantry tilt / shear), be evenly spaced with no gap, and be the same in every echo.
* Candidate pairs are magnitude + phase and real + imaginary stacks of one study. A pair is usable
  when frame of reference, orientation, image size, pixel spacing, echo count, echo times, slice
  count and slice positions agree. Among usable pairs the largest (echoes x slices) wins, then
  magnitude/phase over real/imaginary, then a pair within one series, then equal AcquisitionNumber,
  then the closest series numbers; the others are listed in ``notes``. When
  no pair is usable the refusal names what differs in the pair that came closest.
* Phase -> radians: :mod:`core.dicom.phase_scaling` (Siemens ``rescaled * pi / 4096``; Philips and
  others radians or milliradians told apart by RescaleType and value range); real/imaginary:
  ``phase = atan2(imag, real)``, ``magnitude = |real + i imag|``. Polarity is taken as the product's
  (DESIGN.md section 4); ``phase_flip=True`` negates it (per-site setting).

Every refusal raises :class:`core.errors.DicomInputError` with one line a PACS administrator can act on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from core.dicom.classic import MR_IMAGE_STORAGE, frames_from_classic
from core.dicom.frames import Frame
from core.dicom.phase_scaling import phase_to_radians, wrap
from core.dicom.volume import GREVolume
from core.errors import DicomInputError
from core.geometry import Geometry, b0_direction_for_position

log = logging.getLogger(__name__)

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Patient/study attributes copied into ``GREVolume.patient`` (when present).
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "PatientSize", "IssuerOfPatientID", "OtherPatientIDs", "StudyID", "StudyDate", "StudyTime",
    "StudyDescription", "AccessionNumber", "ReferringPhysicianName", "InstitutionName",
    "StudyInstanceUID",
)

_POS_TOL_MM = 0.05  # positions written by scanners are rounded; two stacks agree within this
_ORIENT_TOL = 1e-4
_TE_TOL_MS = 0.01


# ============================================================================ loading
@dataclass
class DicomScan:
    """What :func:`scan_folder` found: the DICOM datasets and how many files were not DICOM."""

    datasets: list[pydicom.Dataset]
    n_files: int
    n_skipped: int
    skipped_examples: list[str] = field(default_factory=list)


def scan_folder(folder: Path) -> DicomScan:
    """Read every DICOM file under ``folder`` (recursively, any names), skipping the rest quietly.

    A file is DICOM when pydicom reads it with its preamble and ``DICM`` prefix. DICOMDIR files are
    skipped (the images they index are read directly). Files are visited in sorted path order so a
    run is reproducible. A file that has the preamble and prefix but cannot be read (cut short in
    its header, or corrupt) raises :class:`DicomInputError` naming it: skipping it would surface
    later as a misleading "missing slice".
    """
    folder = Path(folder)
    if not folder.exists():
        raise DicomInputError(f"input folder {folder} does not exist")
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    datasets: list[pydicom.Dataset] = []
    skipped: list[str] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if _has_dicom_prefix(path):
                size = path.stat().st_size
                raise DicomInputError(
                    f"truncated or corrupt DICOM file {path} ({size} bytes): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'cannot be read'}") from exc
            skipped.append(str(path))
            continue
        media_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if media_class == DICOMDIR_SOP_CLASS:
            skipped.append(str(path))
            continue
        if media_class in _MR_IMAGE_CLASSES and ("PixelData" not in ds or "SOPInstanceUID" not in ds):
            # pydicom stops quietly at the end of a file cut between two elements
            raise DicomInputError(
                f"truncated or corrupt DICOM file {path} ({path.stat().st_size} bytes): an MR image "
                f"without {'PixelData' if 'PixelData' not in ds else 'SOPInstanceUID'}")
        datasets.append(ds)
    if skipped:
        log.info("skipped %d non-DICOM file(s) under %s", len(skipped), folder)
    return DicomScan(datasets, len(paths), len(skipped), skipped[:5])


#: MR Image, Enhanced MR Image, Legacy Converted Enhanced MR Image Storage
_MR_IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}


def _has_dicom_prefix(path: Path) -> bool:
    """True when ``path`` starts with a 128-byte preamble and ``DICM`` (PS3.10 7.1)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def load_datasets(folder: Path) -> list[pydicom.Dataset]:
    """Every DICOM dataset under ``folder`` (any layout, recursive); non-DICOM files are skipped.

    The number of skipped files is logged; :func:`scan_folder` returns it.
    """
    return scan_folder(folder).datasets


def frames_from_dataset(ds: pydicom.Dataset) -> list[Frame]:
    """The image planes of one dataset: one Frame for classic MR, one per frame for Enhanced MR.

    Other SOP classes (SR, SEG, presentation states, other modalities) give an empty list.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == ENHANCED_MR_IMAGE_STORAGE:
        from core.dicom.enhanced import frames_from_enhanced  # Enhanced MR lives in its own module

        return frames_from_enhanced(ds)
    if sop_class == MR_IMAGE_STORAGE:
        return frames_from_classic(ds)
    return []


# ============================================================================ stacks
@dataclass
class _Echo:
    te_ms: float
    echo_number: int | None
    frames: list[Frame]  # sorted by position along the normal


@dataclass
class _Stack:
    """Frames of one series and one component with one orientation and image size."""

    frames: list[Frame]
    echoes: list[_Echo] = field(default_factory=list)
    error: str | None = None  # why the stack cannot be used, found by _organise

    @property
    def first(self) -> Frame:
        return self.frames[0]

    @property
    def component(self) -> str:
        return self.first.component or "?"

    @property
    def name(self) -> str:
        f = self.first
        kind = {"M": "magnitude", "P": "phase", "R": "real", "I": "imaginary"}.get(self.component, "?")
        label = f"series {f.series_number}" if f.series_number is not None else f"series {f.series_instance_uid}"
        desc = f" '{f.series_description}'" if f.series_description else ""
        return f"{kind} images of {label}{desc}"

    @property
    def n_slices(self) -> int:
        return len(self.echoes[0].frames) if self.echoes else 0

    def positions(self) -> np.ndarray:
        return np.stack([f.position for f in self.echoes[0].frames])


def _build_stacks(frames: list[Frame]) -> list[_Stack]:
    stacks: list[_Stack] = []
    index: dict[tuple, list[_Stack]] = {}
    for f in frames:
        key = (f.study_instance_uid, f.series_instance_uid, f.component, f.rows, f.columns)
        for s in index.get(key, []):
            if np.allclose(s.first.orientation, f.orientation, atol=_ORIENT_TOL):
                s.frames.append(f)
                break
        else:
            s = _Stack([f])
            index.setdefault(key, []).append(s)
            stacks.append(s)
    return stacks


def _organise(stack: _Stack) -> None:
    """Split a stack into echoes, sort slices, and check its grid; sets ``stack.error`` if unusable."""
    try:
        stack.echoes = _split_echoes(stack)
        _check_grid(stack)
    except DicomInputError as exc:
        stack.error = str(exc)


def _split_echoes(stack: _Stack) -> list[_Echo]:
    frames = stack.frames
    if any(f.echo_time_ms is None for f in frames):
        raise DicomInputError(f"EchoTime missing in {stack.name}: echo times are needed to compute the field")
    # EchoNumbers only help where every frame has one (some exports drop it from some images)
    use_numbers = all(f.echo_number is not None for f in frames)
    groups: dict[tuple, list[Frame]] = {}
    for f in frames:
        key = (round(float(f.echo_time_ms) / _TE_TOL_MS), f.echo_number if use_numbers else None)
        groups.setdefault(key, []).append(f)
    keys = sorted(groups, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    tes = [k[0] for k in keys]
    if len(set(tes)) != len(tes):
        raise DicomInputError(
            f"{stack.name} has several echoes with the same EchoTime: echo times are needed to compute "
            f"the field (GE research sequences store the real TEs in private tags 0019,10A9/0019,10A2)"
        )
    echoes = []
    for key in keys:
        fr = sorted(groups[key], key=lambda f: f.slice_location())
        echoes.append(_Echo(float(np.median([f.echo_time_ms for f in fr])), key[1], fr))
    return echoes


def _check_grid(stack: _Stack) -> None:
    """One evenly spaced, unsheared set of slice positions, the same in every echo."""
    name = stack.name
    counts = [len(e.frames) for e in stack.echoes]
    if len(set(counts)) > 1:
        detail = ", ".join(f"TE {e.te_ms:g} ms: {len(e.frames)}" for e in stack.echoes)
        raise DicomInputError(f"missing slice: echoes of {name} hold different numbers of slices ({detail})")
    ref = stack.echoes[0].frames
    pos = np.stack([f.position for f in ref])
    for e in stack.echoes[1:]:
        other = np.stack([f.position for f in e.frames])
        if np.max(np.abs(other - pos)) > _POS_TOL_MM:
            raise DicomInputError(f"slice positions differ between echoes of {name}")
    if len(ref) < 2:
        raise DicomInputError(f"{name} has a single slice: a 3D volume needs at least 2 slices")
    normal = ref[0].normal()
    loc = pos @ normal
    diffs = np.diff(loc)
    nominal = float(np.median(diffs))
    if np.any(diffs < max(_POS_TOL_MM, 0.01 * nominal)) or nominal <= 0:
        raise DicomInputError(f"duplicate slice positions in {name}: two images at the same place")
    rel = pos - pos[0]
    in_plane = rel - np.outer(rel @ normal, normal)
    if np.max(np.linalg.norm(in_plane, axis=1)) > max(_POS_TOL_MM, 0.01 * nominal):
        raise DicomInputError(
            f"gantry tilt or sheared slice stack in {name}: slice positions move within the image "
            f"plane; send an orthogonal (non-tilted) acquisition"
        )
    ratio = diffs / nominal
    gap = (ratio > 1.5) & (np.abs(ratio - np.round(ratio)) < 0.1)  # a whole number of slices absent
    if np.any(gap):
        k = int(np.argmax(gap))
        n_missing = int(round(float(ratio[k]))) - 1
        raise DicomInputError(
            f"missing slice: {name} has a gap of {diffs[k]:.3g} mm after slice {k + 1} "
            f"({n_missing} slice(s) missing at {nominal:.3g} mm spacing)"
        )
    if np.any(np.abs(ratio - 1.0) > 0.01 + _POS_TOL_MM / nominal):
        raise DicomInputError(
            f"uneven slice spacing in {name}: {diffs.min():.4g} to {diffs.max():.4g} mm between slices"
        )


# ============================================================================ pairing
_STAGES = (
    "frame of reference", "orientation", "image size", "pixel spacing", "stack", "echo count",
    "echo times", "slice count", "slice positions",
)


def _compare(a: _Stack, b: _Stack) -> tuple[int, str | None]:
    """How far two stacks agree: (stage reached, reason they differ or None if compatible)."""
    fa, fb = a.first, b.first
    if fa.frame_of_reference_uid != fb.frame_of_reference_uid:
        return 0, f"{a.name} and {b.name} have different frames of reference"
    if not np.allclose(fa.orientation, fb.orientation, atol=_ORIENT_TOL):
        return 1, f"{a.name} and {b.name} differ in orientation (ImageOrientationPatient)"
    if (fa.rows, fa.columns) != (fb.rows, fb.columns):
        return 2, (
            f"image size differs: {a.name} {fa.rows}x{fa.columns}, {b.name} {fb.rows}x{fb.columns}"
        )
    if not np.allclose(fa.pixel_spacing, fb.pixel_spacing, atol=1e-4):
        return 3, f"pixel spacing differs: {a.name} {fa.pixel_spacing}, {b.name} {fb.pixel_spacing}"
    for s in (a, b):
        if s.error:
            return 4, s.error
    if not _is_phase_difference(a, b):  # a phase-difference map has one phase echo, at TE2
        if len(a.echoes) != len(b.echoes):
            return 5, f"echo count differs: {a.name} has {len(a.echoes)} echoes, {b.name} has {len(b.echoes)}"
        ta = np.array([e.te_ms for e in a.echoes])
        tb = np.array([e.te_ms for e in b.echoes])
        if np.max(np.abs(ta - tb)) > _TE_TOL_MS:
            return 6, f"echo times differ: {a.name} {ta.tolist()} ms, {b.name} {tb.tolist()} ms"
    if a.n_slices != b.n_slices:
        return 7, f"missing slice: {a.name} has {a.n_slices} slices per echo, {b.name} has {b.n_slices}"
    shift = float(np.max(np.linalg.norm(a.positions() - b.positions(), axis=1)))
    if shift > _POS_TOL_MM:
        return 8, f"slice positions differ by up to {shift:.3g} mm between {a.name} and {b.name}"
    return len(_STAGES), None


def _is_phase_difference(a: _Stack, b: _Stack) -> bool:
    """A Siemens-style double-echo field map: ``a`` magnitude with two echoes, ``b`` one phase image
    per slice at the second echo time, holding phi(TE2) - phi(TE1) (gre_field_mapping; dcm2niix
    names it ``_phasediff``, BIDS EchoTime1/EchoTime2)."""
    return (a.component == "M" and b.component == "P" and len(a.echoes) == 2 and len(b.echoes) == 1
            and abs(b.echoes[0].te_ms - a.echoes[1].te_ms) <= _TE_TOL_MS
            and abs(b.echoes[0].te_ms - a.echoes[0].te_ms) > _TE_TOL_MS)


def _field_map_in_hz(frames: list[Frame]) -> str | None:
    """What a direct field map (the scanner's estimate in Hz, GE B0map / Philips B0 FIELD_MAP) in
    ``frames`` is, named for the refusal; None if there is none."""
    for f in frames:
        label = f"series {f.series_number} '{f.series_description}'"
        if "FIELD_MAP" in f.image_type or "FIELDMAPHZ" in f.image_type:
            return f"{f.manufacturer or 'a'} direct B0 field map in Hz ({label})"
        ds = f.dataset
        if ds is not None and "GE" in f.manufacturer.upper():
            seq = ds.get((0x0019, 0x109C))
            if seq is not None and "B0" in str(seq.value).upper():
                return f"GE B0 field map (magnitude + field in Hz, pulse sequence {str(seq.value).strip()!r}, {label})"
    return None


@dataclass
class _Candidate:
    first: _Stack  # magnitude or real
    second: _Stack  # phase or imaginary
    stage: int
    reason: str | None

    @property
    def complex_pair(self) -> bool:
        return self.first.component == "R"

    @property
    def phase_difference(self) -> bool:
        return _is_phase_difference(self.first, self.second)

    def rank(self) -> tuple:
        fa, fb = self.first.first, self.second.first
        same_series = fa.series_instance_uid == fb.series_instance_uid
        gap = abs((fa.series_number or 0) - (fb.series_number or 0))
        same_acquisition = fa.acquisition_key == fb.acquisition_key
        size = len(self.first.echoes) * self.first.n_slices
        return (
            self.stage, not self.phase_difference, size, not self.complex_pair, same_series, same_acquisition, -gap,
            -(fa.series_number or 0),
        )


def select_gre(frames: list[Frame], *, phase_flip: bool = False) -> GREVolume:
    """Pick one GRE acquisition (magnitude + phase, or real + imaginary) and build its volume.

    Args:
        frames: frames of any number of series (from :func:`frames_from_dataset`).
        phase_flip: negate the phase after vendor scaling (a per-site polarity setting).

    Returns:
        The :class:`GREVolume`: float32 ``[echo, i, j, k]`` magnitude and wrapped phase (radians),
        echo times ascending, geometry from the sorted first-echo magnitude stack.

    Raises:
        DicomInputError: no images, no phase, missing slice, mismatching magnitude/phase, unequal
            echo counts, unknown phase scaling, gantry tilt, ... (one line saying which).
    """
    if not frames:
        raise DicomInputError("no MR images found in the input (no classic or Enhanced MR image frames)")
    notes: list[str] = []
    typed = [f for f in frames if f.component is not None]
    n_untyped = len(frames) - len(typed)
    if n_untyped:
        notes.append(f"{n_untyped} image(s) whose ImageType says neither magnitude, phase, real nor imaginary were ignored")
    stacks = _build_stacks(typed)
    by_comp = {c: [s for s in stacks if s.component == c] for c in "MPRI"}
    if not by_comp["P"] and not (by_comp["R"] and by_comp["I"]):
        hz_map = _field_map_in_hz(frames)
        if hz_map:
            raise DicomInputError(
                f"the input is a {hz_map}, not GRE phase: a field map already in Hz is not accepted "
                f"as a QSM source; send the multi-echo GRE (or SWI) magnitude and phase series"
            )
        if by_comp["M"] or by_comp["R"] or by_comp["I"]:
            names = "; ".join(s.name for s in stacks[:3]) + (f"; and {len(stacks) - 3} more" if len(stacks) > 3 else "")
            raise DicomInputError(
                f"no phase series: the input holds only {names}; send the GRE phase series as well"
            )
        raise DicomInputError("no magnitude or phase images found: ImageType does not identify any GRE series")
    if not by_comp["M"] and not (by_comp["R"] and by_comp["I"]):
        raise DicomInputError("phase images found but no matching magnitude series; send the GRE magnitude series as well")
    for s in stacks:
        _organise(s)

    candidates: list[_Candidate] = []
    for first_c, second_c in (("M", "P"), ("R", "I")):
        for a in by_comp[first_c]:
            for b in by_comp[second_c]:
                if a.first.study_instance_uid != b.first.study_instance_uid:
                    continue
                stage, reason = _compare(a, b)
                candidates.append(_Candidate(a, b, stage, reason))
    if not candidates:
        raise DicomInputError("magnitude and phase images belong to different studies")
    usable = [c for c in candidates if c.reason is None]
    if not usable:
        best = max(candidates, key=_Candidate.rank)
        raise DicomInputError(best.reason or "magnitude and phase do not match")
    studies = {c.first.first.study_instance_uid for c in usable}
    if len(studies) > 1:
        raise DicomInputError(
            f"the input holds usable GRE series from {len(studies)} studies; send one study per job"
        )
    usable.sort(key=_Candidate.rank, reverse=True)
    chosen = usable[0]
    for other in usable[1:]:
        notes.append(f"also usable but not chosen: {other.first.name} with {other.second.name}")
    return _build_volume(chosen, phase_flip, notes)


def _stack_values(stack: _Stack) -> np.ndarray:
    """Rescaled float64 ``[echo, i, j, k]`` (per-frame RescaleSlope/Intercept applied)."""
    n_e, n_k = len(stack.echoes), stack.n_slices
    f0 = stack.first
    # filled slice by slice in acquisition layout [e, k, row, column] (contiguous writes), then
    # transposed to [e, i, j, k] once: writing each slice into the last axis strides through memory
    out = np.empty((n_e, n_k, f0.rows, f0.columns), dtype=np.float64)
    for e, echo in enumerate(stack.echoes):
        for k, f in enumerate(echo.frames):
            px = f.pixels()
            if px.shape != (f0.rows, f0.columns):
                raise DicomInputError(
                    f"pixel data of instance {f.sop_instance_uid} is {px.shape}, header says {f0.rows}x{f0.columns}"
                )
            np.multiply(px, f.rescale_slope, out=out[e, k], dtype=np.float64)
            out[e, k] += f.rescale_intercept
    return np.ascontiguousarray(out.transpose(0, 3, 2, 1))


def _patient_and_sources(first, first_echo: list) -> tuple[dict, list]:
    """Patient attributes of ``first``'s dataset and the first echo's source datasets, each instance
    once (a multi-frame instance holds many frames)."""
    patient = {}
    if first.dataset is not None:
        for kw in PATIENT_KEYWORDS:
            value = first.dataset.get(kw)
            if value not in (None, ""):
                patient[kw] = str(value)
    if first_echo[0].frame_number is None:
        return patient, [f.dataset for f in first_echo]
    return patient, list({id(f.dataset): f.dataset for f in first_echo}.values())


def _build_volume(chosen: _Candidate, phase_flip: bool, notes: list[str]) -> GREVolume:
    a, b = chosen.first, chosen.second
    fa = a.first
    if chosen.complex_pair:
        z = _stack_values(a) + 1j * _stack_values(b)
        magnitude = np.abs(z).astype(np.float32)
        phase = wrap(np.angle(z))
        scaling = "real/imaginary: phase = atan2(imag, real), magnitude = |real + i imag|"
        notes.append("magnitude computed from real and imaginary images; source images are the real images")
    else:
        magnitude = _stack_values(a).astype(np.float32)
        if chosen.phase_difference:
            magnitude = magnitude[:1]  # the first echo's: brighter, and the source images referenced
        values = _stack_values(b)
        types = {f.rescale_type for f in b.frames}
        pairs = {(float(f.rescale_slope), float(f.rescale_intercept)) for f in b.frames}
        phase, scaling = phase_to_radians(
            values,
            manufacturer=b.first.manufacturer,
            rescale_type=types.pop() if len(types) == 1 else None,
            slopes_intercepts=pairs,
        )
    if phase_flip:
        phase = wrap(-phase.astype(np.float64))
    if any(e.echo_number is None for e in a.echoes):
        notes.append("EchoNumbers missing: echoes ordered by EchoTime")
    elif len({e.echo_number for e in a.echoes}) != len(a.echoes):
        notes.append("EchoNumbers repeat across echoes: echoes ordered by EchoTime")
    elif [e.echo_number for e in a.echoes] != sorted(e.echo_number for e in a.echoes):
        notes.append("EchoNumbers not in EchoTime order: echoes ordered by EchoTime")

    first_echo = a.echoes[0].frames
    locs = np.array([f.slice_location() for f in first_echo])
    spacing = float(np.mean(np.diff(locs)))
    try:
        geometry = Geometry.from_dicom(
            rows=fa.rows,
            columns=fa.columns,
            image_orientation=fa.orientation,
            first_position=first_echo[0].position,
            pixel_spacing=fa.pixel_spacing,
            slice_spacing_mm=spacing,
            n_slices=len(first_echo),
            frame_of_reference_uid=fa.frame_of_reference_uid,
        ).snapped()  # float noise of the decimal strings removed, as for NIfTI (core.geometry.snap_affine)
    except ValueError as exc:
        raise DicomInputError(f"cannot build the image grid of {a.name}: {exc}") from exc
    position = fa.dataset.get("PatientPosition") if fa.dataset is not None else None
    b0_lps, position_note = b0_direction_for_position(str(position) if position else None)
    if position_note:
        notes.append(position_note)
    if b0_lps != geometry.b0_direction_lps:
        geometry = Geometry(geometry.shape, geometry.affine, geometry.frame_of_reference_uid, b0_lps)
    b0 = next((f.field_strength_t for f in a.frames if f.field_strength_t), None)
    if b0 is None:
        raise DicomInputError(
            f"MagneticFieldStrength and ImagingFrequency are both missing in {a.name}: the field strength is needed"
        )
    patient, sources = _patient_and_sources(fa, first_echo)
    echo_times_ms = [e.te_ms for e in a.echoes]
    if chosen.phase_difference:
        te1, te2 = echo_times_ms
        echo_times_ms = [te2 - te1]
        notes.append(
            f"phase-difference field map: {b.name} holds phi(TE2) - phi(TE1) (TE {te1:g} and {te2:g} ms); "
            f"used as one echo of delta-TE {te2 - te1:g} ms (no phase offset), magnitude of TE {te1:g} ms; "
            f"a field map's short delta-TE gives a noisy susceptibility map")
    return GREVolume(
        geometry=geometry,
        magnitude=magnitude,
        phase_rad=phase,
        echo_times_s=np.array([t * 1e-3 for t in echo_times_ms], dtype=np.float64),
        field_strength_t=float(b0),
        manufacturer=fa.manufacturer,
        phase_scaling=scaling,
        phase_flipped=phase_flip,
        study_instance_uid=fa.study_instance_uid,
        magnitude_series_uid=fa.series_instance_uid,
        phase_series_uid=b.first.series_instance_uid,
        patient=patient,
        source_datasets=sources,
        slice_references=[(str(f.dataset.SOPClassUID), f.sop_instance_uid, f.frame_number)
                          for f in first_echo] if all(f.dataset is not None for f in first_echo) else [],
        notes=notes,
    )


def load_gre(folder: Path, *, phase_flip: bool = False) -> GREVolume:
    """Read a folder of DICOM (any layout) and return its GRE acquisition as a :class:`GREVolume`.

    Convenience for :func:`scan_folder` + :func:`frames_from_dataset` + :func:`select_gre`.
    """
    scan = scan_folder(folder)
    if not scan.datasets:
        raise DicomInputError(
            f"no DICOM files found in {folder} ({scan.n_files} file(s) looked at, none DICOM)"
        )
    frames: list[Frame] = []
    for ds in scan.datasets:
        frames.extend(frames_from_dataset(ds))
    if not frames:
        raise DicomInputError(
            f"no MR images in {folder}: {len(scan.datasets)} DICOM file(s), none MR Image or Enhanced MR Image"
        )
    volume = select_gre(frames, phase_flip=phase_flip)
    if scan.n_skipped:
        volume.notes.append(f"{scan.n_skipped} non-DICOM file(s) skipped")
    return volume
