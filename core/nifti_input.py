"""Research input: NIfTI + JSON sidecars as dcm2niix writes them -> the same :class:`GREVolume` the
DICOM reader builds, and a precomputed QSM map (NIfTI) -> a :class:`QSMResult` for detection.

What is read (one folder, recursively; every ``*.nii`` / ``*.nii.gz`` with its ``.json`` sidecar):

* **Kind of each file**: the sidecar's ``ImageType`` first (dcm2niix copies the DICOM values, e.g.
  ``["ORIGINAL","PRIMARY","P","ND"]``; same tokens as :func:`core.dicom.classic.component_from_image_type`:
  M/MAGNITUDE, P/PHASE, REAL, IMAGINARY), the file name only when ImageType says nothing: dcm2niix
  suffixes ``_ph``, ``_real``, ``_imaginary``; BIDS ``part-mag|phase|real|imag``. A QSM map is a file
  whose sidecar has ``"Quantity": "susceptibility"`` (or ImageType ``QSM``), or whose name holds
  ``Chimap`` or ends in ``qsm`` / ``chi``; a brain mask one whose name holds ``mask``.
* **Echoes**: one file per echo (dcm2niix's default, ``_e1``, ``_e2``...; BIDS ``echo-1``), each with
  ``EchoTime`` in seconds; a 4-D file is split along its 4th axis when ``EchoTime`` is a list of that
  length. Echoes are ordered by EchoTime; magnitude and phase must hold the same echo times.
* **Grid**: the NIfTI affine (sform when its code is set, else qform; neither set is refused) is
  RAS; LPS = diag(-1, -1, 1) @ RAS. dcm2niix flips image axes on conversion; the arrays are reoriented
  (axis permutation and flips only, no resampling) back to the DICOM layout the DICOM reader builds:
  i along the sidecar's ``ImageOrientationPatientDICOM`` row, j along its column, k along row x column
  (without that key: the nearest right-handed layout). Same voxels, same order -> same detections.
* **Phase -> radians**: :func:`core.dicom.phase_scaling.phase_to_radians` on the scaled values
  (NIfTI scl_slope/scl_inter applied; dcm2niix carries the DICOM rescale there: Siemens slope 2,
  intercept -4096), with the sidecar's Manufacturer; a range that is no phase is refused.
  Real/imaginary: phase = atan2(imag, real), magnitude = |real + i imag|.
* **B0**: ``MagneticFieldStrength`` (else ``ImagingFrequency`` / 42.577 MHz/T).

There are no DICOM UIDs or patient data in dcm2niix output (it anonymises by default). Study, series
and frame-of-reference UIDs are the sidecar's when present (``dcm2niix -ba n``), else name-based
(:func:`core.uids.derived_uid`) over the sidecars and NIfTI headers, so the same files always give
the same result UIDs. Patient attributes are placeholders, marked as such: PatientID = the BIDS
subject (``sub-X``) or the folder name, PatientName ``NIFTI^<id>``. The SEG, SR and key images must
reference source images: :func:`synthesise_source_series` makes the first-echo magnitude a classic
MR series (written with the results, ``dicom/source``), so every reference resolves.

Written by hand because no library reads dcm2niix's sidecar conventions into a phase/echo model;
nibabel does the NIfTI reading and pydicom the DICOM datasets.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import MRImageStorage

from core.dicom.classic import component_from_image_type
from core.dicom.phase_scaling import phase_to_radians, wrap
from core.dicom.volume import GREVolume
from core.errors import DicomInputError, NiftiInputError
from core.geometry import LPS_TO_RAS, Geometry, snap_affine
from core.physics import GAMMA_BAR_HZ_PER_T
from core.uids import derived_uid, is_valid_uid

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_TE_TOL_S = 1e-5
_AFFINE_TOL_MM = 0.01
#: A susceptibility map in ppm: brain tissue within a few ppm; larger magnitudes mean ppb or a field map.
QSM_MAX_ABS_PPM = 20.0

# "Chimap" anywhere (BIDS suffix); "qsm" / "chi" only as the name's last word, since protocol names
# such as "QSM_GRE_3D_ME" (dcm2niix names files after them) hold magnitude and phase
_QSM_NAME = re.compile(r"(chimap|(^|[_.-])(qsm|chi)$)", re.IGNORECASE)
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)
_NAME_COMPONENT = (  # (pattern on the file stem, component); first match wins
    (re.compile(r"(_ph$|_ph_|part-phase|_phase($|_))", re.IGNORECASE), "P"),
    (re.compile(r"(_real($|_)|part-real)", re.IGNORECASE), "R"),
    (re.compile(r"(_imaginary($|_)|_imag($|_)|part-imag)", re.IGNORECASE), "I"),
    (re.compile(r"(part-mag|_mag($|_)|_magnitude($|_))", re.IGNORECASE), "M"),
)
_BIDS_SUBJECT = re.compile(r"(?:^|[_/])sub-([A-Za-z0-9]+)")


def nifti_stem(path: Path) -> str:
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: Path) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def find_nifti(folder: Path) -> list[Path]:
    """Every NIfTI file under ``folder`` (recursive, sorted)."""
    folder = Path(folder)
    paths = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return [p for p in paths if is_nifti(p)]


def read_sidecar(path: Path) -> dict | None:
    """The JSON sidecar beside a NIfTI file (``<stem>.json``), ``None`` when there is none."""
    side = Path(path).with_name(nifti_stem(path) + ".json")
    if not side.exists():
        return None
    try:
        data = json.loads(side.read_text())
    except (OSError, ValueError) as exc:
        raise NiftiInputError(f"sidecar {side.name} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise NiftiInputError(f"sidecar {side.name} is not a JSON object")
    return data


def classify(path: Path, sidecar: dict | None) -> str | None:
    """``"QSM"``, ``"MASK"``, ``"M"``, ``"P"``, ``"R"``, ``"I"`` or ``None`` (see module docstring)."""
    stem = nifti_stem(path)
    side = sidecar or {}
    image_type = side.get("ImageType")
    tokens = [str(t).upper() for t in image_type] if isinstance(image_type, list) else []
    quantity = str(side.get("Quantity", "")).lower()
    if quantity in ("susceptibility", "chi", "magnetic susceptibility") or "QSM" in tokens:
        return "QSM"
    if tokens:
        comp = component_from_image_type(tokens)
        if comp is not None:
            return comp
    if _QSM_NAME.search(stem):
        return "QSM"
    if _MASK_NAME.search(stem):
        return "MASK"
    for pattern, comp in _NAME_COMPONENT:
        if pattern.search(stem):
            return comp
    return None


@dataclass
class _Volume:
    """One echo of one component, as read from a file (arrays still in the file's layout)."""

    path: Path
    component: str
    te_s: float | None
    data: np.ndarray  # float64, scaled
    affine_ras: np.ndarray
    scaling: tuple[float, float]
    sidecar: dict = field(default_factory=dict)


def _affine_ras(img, path: Path) -> tuple[np.ndarray, str | None]:
    hdr = img.header
    s_code, q_code = int(hdr["sform_code"]), int(hdr["qform_code"])
    if s_code == 0 and q_code == 0:
        raise NiftiInputError(f"{path.name} has neither sform nor qform: its position in the scanner is unknown")
    sform, qform = hdr.get_sform(), hdr.get_qform()
    note = None
    if s_code and q_code and np.max(np.abs(sform - qform)) > _AFFINE_TOL_MM:
        note = f"{path.name}: sform and qform differ by up to {np.max(np.abs(sform - qform)):.3g}; sform used"
    return (sform if s_code else qform).astype(np.float64), note


def _read(path: Path, component: str, sidecar: dict, notes: list[str]) -> list[_Volume]:
    """The echoes of one file (a 4-D file with an EchoTime list gives one per volume)."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds for a broken file
        raise NiftiInputError(f"{path.name} is not a readable NIfTI file: {exc}") from None
    affine, note = _affine_ras(img, path)
    if note:
        notes.append(note)
    slope, inter = img.dataobj.slope, img.dataobj.inter
    scaling = (float(slope) if np.isfinite(slope) and slope != 0 else 1.0,
               float(inter) if np.isfinite(inter) else 0.0)
    te = sidecar.get("EchoTime")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        if isinstance(te, list):
            te = te[0] if len(te) == 1 else None
        tes = [te]
        vols = [data]
    elif data.ndim == 4:
        if not (isinstance(te, list) and len(te) == data.shape[3]):
            raise NiftiInputError(
                f"{path.name} holds {data.shape[3]} volumes but its sidecar gives no EchoTime list of that "
                f"length: write one file per echo (dcm2niix's default) or an EchoTime list"
            )
        tes = list(te)
        vols = [data[..., n] for n in range(data.shape[3])]
    else:
        raise NiftiInputError(f"{path.name} is {data.ndim}-D: expected a 3-D volume per echo")
    out = []
    for t, v in zip(tes, vols):
        te_s = None
        if t is not None:
            try:
                te_s = float(t)
            except (TypeError, ValueError):
                raise NiftiInputError(f"{path.name}: EchoTime {t!r} is not a number of seconds") from None
        out.append(_Volume(path, component, te_s, v, affine, scaling, sidecar))
    return out


# ============================================================================ orientation
def _index_transform(direction_lps: np.ndarray, row: np.ndarray | None, col: np.ndarray | None,
                     shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], np.ndarray]:
    """Axis permutation and flips that put i along ``row``, j along ``col`` and k along row x col.

    Returns ``(perm, flips, T)``: new axis ``t`` is old axis ``perm[t]`` (reversed where
    ``flips[t]``); ``T`` (4x4) maps new voxel indices to old ones, so new affine = old affine @ T.
    """
    if row is None or col is None:
        d = direction_lps
        targets = []
        for a in range(3):  # keep the file's axes, flip j when the grid is left-handed
            targets.append(d[:, a] * (-1.0 if (a == 1 and np.linalg.det(d) < 0) else 1.0))
    else:
        targets = [row, col, np.cross(row, col)]
    perm, flips = [], []
    for t in targets:
        dots = direction_lps.T @ t
        a = int(np.argmax(np.abs(dots)))
        if a in perm:
            raise NiftiInputError("ImageOrientationPatientDICOM does not match the NIfTI axes (oblique mismatch)")
        perm.append(a)
        flips.append(bool(dots[a] < 0))
    T = np.zeros((4, 4))
    T[3, 3] = 1.0
    for t, (a, f) in enumerate(zip(perm, flips)):
        T[a, t] = -1.0 if f else 1.0
        if f:
            T[a, 3] = shape[a] - 1
    return tuple(perm), tuple(flips), T


def _reorient(arr: np.ndarray, perm, flips) -> np.ndarray:
    out = np.transpose(arr, perm)
    for t, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=t)
    return np.ascontiguousarray(out)


def _dicom_orientation(sidecar: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
    iop = sidecar.get("ImageOrientationPatientDICOM")
    if not (isinstance(iop, list) and len(iop) == 6):
        return None, None
    v = np.asarray(iop, dtype=np.float64)
    row, col = v[:3] / np.linalg.norm(v[:3]), v[3:] / np.linalg.norm(v[3:])
    return row, col


def to_lps_grid(affine_ras: np.ndarray, shape: tuple[int, int, int], sidecar: dict
                ) -> tuple[np.ndarray, tuple, tuple]:
    """LPS affine of the reoriented grid, and the (perm, flips) to apply to each array."""
    lps = LPS_TO_RAS @ affine_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row, col = _dicom_orientation(sidecar)
    perm, flips, T = _index_transform(lps[:3, :3] / spacing, row, col, shape)
    return snap_affine(lps @ T), perm, flips


# ============================================================================ UIDs and patient
def _digest(paths: list[Path]) -> str:
    """sha256 over the sidecars and NIfTI headers (not the pixels: cheap, and enough to tell studies apart)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        side = p.with_name(nifti_stem(p) + ".json")
        if side.exists():
            h.update(side.read_bytes())
        h.update(nib.load(str(p)).header.binaryblock)
    return h.hexdigest()


def _sidecar_uid(sidecars: list[dict], key: str) -> str | None:
    for s in sidecars:
        v = s.get(key)
        if isinstance(v, str) and is_valid_uid(v):
            return v
    return None


def placeholder_patient(folder: Path, paths: list[Path], sidecars: list[dict]) -> tuple[dict, str]:
    """Patient/study attributes for the result objects, and a note saying where they came from."""
    pid = next((str(s["PatientID"]) for s in sidecars if s.get("PatientID")), None)
    if pid:
        name = next((str(s["PatientName"]) for s in sidecars if s.get("PatientName")), pid)
        return {"PatientID": pid, "PatientName": name}, "PatientID/PatientName from the sidecar"
    subject = next((m.group(1) for p in paths if (m := _BIDS_SUBJECT.search(str(p.relative_to(folder)) if p.is_relative_to(folder) else p.name))), None)
    pid = subject or re.sub(r"[^A-Za-z0-9_.-]", "_", Path(folder).resolve().name)[:64] or "NIFTI"
    patient = {"PatientID": pid, "PatientName": f"NIFTI^{pid}",
               "StudyDescription": "NIfTI research input (no DICOM patient data)"}
    source = "the BIDS subject" if subject else "the folder name"
    return patient, f"no patient data in NIfTI: placeholders PatientID={pid} (from {source}), PatientName=NIFTI^{pid}"


# ============================================================================ GRE
@dataclass
class NiftiFiles:
    """What :func:`scan_nifti` found, by kind (``QSM``, ``MASK``, ``M``, ``P``, ``R``, ``I``, ``None``)."""

    folder: Path
    by_kind: dict[str | None, list[Path]]
    sidecars: dict[Path, dict | None]

    @property
    def all(self) -> list[Path]:
        return [p for ps in self.by_kind.values() for p in ps]

    def describe(self) -> str:
        names = {"QSM": "QSM map", "MASK": "mask", "M": "magnitude", "P": "phase", "R": "real",
                 "I": "imaginary", None: "unclassified"}
        return ", ".join(f"{len(v)} {names[k]}" for k, v in self.by_kind.items() if v) or "no NIfTI files"


def scan_nifti(folder: Path) -> NiftiFiles:
    """Classify every NIfTI file under ``folder`` (reads sidecars, not pixels)."""
    by_kind: dict[str | None, list[Path]] = {k: [] for k in ("QSM", "MASK", "M", "P", "R", "I", None)}
    sidecars = {}
    for p in find_nifti(folder):
        side = read_sidecar(p)
        sidecars[p] = side
        by_kind[classify(p, side)].append(p)
    return NiftiFiles(Path(folder), by_kind, sidecars)


def _echo_stack(files: NiftiFiles, comp: str, notes: list[str]) -> list[_Volume]:
    vols: list[_Volume] = []
    for p in files.by_kind[comp]:
        side = files.sidecars[p]
        if side is None:
            raise NiftiInputError(
                f"{p.name} has no JSON sidecar ({nifti_stem(p)}.json): EchoTime and MagneticFieldStrength come "
                f"from it (dcm2niix writes it with -b y)"
            )
        vols.extend(_read(p, comp, side, notes))
    for v in vols:
        if v.te_s is None:
            raise NiftiInputError(f"{v.path.name}: sidecar has no EchoTime (seconds); echo times are needed to compute the field")
        if not (0 < v.te_s < 1):
            raise NiftiInputError(f"{v.path.name}: EchoTime {v.te_s} is not in seconds (BIDS sidecars give seconds)")
    vols.sort(key=lambda v: v.te_s)
    tes = [v.te_s for v in vols]
    if any(b - a < _TE_TOL_S for a, b in zip(tes, tes[1:])):
        dup = next(v.path.name for a, v in zip(vols, vols[1:]) if v.te_s - a.te_s < _TE_TOL_S)
        raise NiftiInputError(f"two {comp} files share one EchoTime (one is {dup}): one file per echo expected")
    return vols


def _check_same_grid(vols: list[_Volume]) -> None:
    ref = vols[0]
    for v in vols[1:]:
        if v.data.shape != ref.data.shape:
            raise NiftiInputError(
                f"image size differs: {ref.path.name} {'x'.join(map(str, ref.data.shape))}, "
                f"{v.path.name} {'x'.join(map(str, v.data.shape))}"
            )
        if np.max(np.abs(v.affine_ras - ref.affine_ras)) > _AFFINE_TOL_MM:
            raise NiftiInputError(f"{ref.path.name} and {v.path.name} lie on different grids (affines differ)")


def _field_strength(sidecars: list[dict]) -> float:
    for s in sidecars:
        v = s.get("MagneticFieldStrength")
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    for s in sidecars:
        f = s.get("ImagingFrequency")
        if isinstance(f, (int, float)) and f > 0:
            return round(float(f) * 1e6 / GAMMA_BAR_HZ_PER_T, 2)
    raise NiftiInputError("MagneticFieldStrength and ImagingFrequency are both missing from the sidecars: the field strength is needed")


def _first(sidecars: list[dict], key: str, default: str = "") -> str:
    return next((str(s[key]) for s in sidecars if s.get(key)), default)


def _build_gre(files: NiftiFiles, first: list[_Volume], second: list[_Volume] | None,
               notes: list[str], *, phase_flip: bool, kind: str) -> GREVolume:
    """GREVolume from magnitude (+ phase, or real + imaginary) echo volumes on one grid."""
    sidecars = [v.sidecar for v in first + (second or [])]
    manufacturer = _first(sidecars, "Manufacturer")
    shape = first[0].data.shape
    if len(shape) != 3 or min(shape) < 2:
        raise NiftiInputError(f"{first[0].path.name} is {shape}: a 3-D volume with at least 2 slices is needed")
    affine, perm, flips = to_lps_grid(first[0].affine_ras, shape, first[0].sidecar)

    def stack(vols: list[_Volume]) -> np.ndarray:
        return np.stack([_reorient(v.data, perm, flips) for v in vols])

    a = stack(first)
    if second is None:
        magnitude, phase, scaling = a.astype(np.float32), None, "none (precomputed QSM)"
    elif first[0].component == "R":
        z = a + 1j * stack(second)
        magnitude, phase = np.abs(z).astype(np.float32), wrap(np.angle(z))
        scaling = "real/imaginary: phase = atan2(imag, real), magnitude = |real + i imag|"
    else:
        magnitude = a.astype(np.float32)
        try:
            phase, scaling = phase_to_radians(
                stack(second), manufacturer=manufacturer, slopes_intercepts={v.scaling for v in second})
        except DicomInputError as exc:
            raise NiftiInputError(f"phase NIfTI ({second[0].path.name}...): {exc}") from None
        scaling = f"NIfTI {scaling}"
    if phase is not None and phase_flip:
        phase = wrap(-phase.astype(np.float64))

    digest = _digest(files.all)
    study_uid = _sidecar_uid(sidecars, "StudyInstanceUID") or derived_uid("nifti study", digest)
    mag_uid = _sidecar_uid([v.sidecar for v in first], "SeriesInstanceUID") or derived_uid("nifti series", digest, "M")
    phase_uid = ""
    if second is not None:
        phase_uid = _sidecar_uid([v.sidecar for v in second], "SeriesInstanceUID") or derived_uid("nifti series", digest, "P")
    for_uid = _sidecar_uid(sidecars, "FrameOfReferenceUID") or derived_uid("nifti frame of reference", digest)
    try:
        geometry = Geometry(shape=tuple(magnitude.shape[1:]), affine=affine, frame_of_reference_uid=for_uid)
    except ValueError as exc:
        raise NiftiInputError(f"cannot use the grid of {first[0].path.name}: {exc}") from None
    patient, note = placeholder_patient(files.folder, files.all, sidecars)
    notes.append(note)
    if files.by_kind[None]:
        notes.append(f"{len(files.by_kind[None])} NIfTI file(s) neither magnitude, phase nor QSM ignored: "
                     + ", ".join(p.name for p in files.by_kind[None][:3]))
    gre = GREVolume(
        geometry=geometry,
        magnitude=magnitude,
        phase_rad=phase if phase is not None else np.zeros((0,) + magnitude.shape[1:], np.float32),
        echo_times_s=np.array([v.te_s for v in first], dtype=np.float64),
        field_strength_t=_field_strength(sidecars),
        manufacturer=manufacturer,
        phase_scaling=scaling,
        phase_flipped=bool(phase_flip and phase is not None),
        study_instance_uid=study_uid,
        magnitude_series_uid=mag_uid,
        phase_series_uid=phase_uid,
        patient=patient,
        notes=notes,
        input_kind=kind,
    )
    gre.source_datasets = synthesise_source_series(gre, sidecars)
    gre.sources_synthesised = True
    return gre


def _refuse_unreadable(files: NiftiFiles) -> None:
    """A NIfTI file that nothing classifies and that has no sidecar: say so instead of ignoring it."""
    for p in files.by_kind[None]:
        if files.sidecars[p] is None:
            raise NiftiInputError(
                f"{p.name} has no JSON sidecar ({nifti_stem(p)}.json): cannot tell magnitude from phase, nor read "
                f"EchoTime (dcm2niix writes sidecars with -b y)"
            )


def _pair(files: NiftiFiles, notes: list[str]) -> tuple[list[_Volume], list[_Volume] | None]:
    k = files.by_kind
    _refuse_unreadable(files)
    if k["M"] and k["P"]:
        mags, phases = _echo_stack(files, "M", notes), _echo_stack(files, "P", notes)
    elif k["R"] and k["I"]:
        mags, phases = _echo_stack(files, "R", notes), _echo_stack(files, "I", notes)
    elif k["P"]:
        raise NiftiInputError(f"phase NIfTI found but no magnitude ({files.describe()}); add the magnitude echoes")
    elif k["M"]:
        raise NiftiInputError(f"no phase NIfTI: the folder holds {files.describe()}; add the phase echoes (dcm2niix *_ph.nii.gz)")
    else:
        raise NiftiInputError(f"no magnitude/phase NIfTI recognised: {files.describe()} (ImageType or _ph / part-phase names tell them apart)")
    _check_same_grid(mags + phases)
    ta, tb = [v.te_s for v in mags], [v.te_s for v in phases]
    if len(ta) != len(tb) or np.max(np.abs(np.subtract(ta, tb))) > _TE_TOL_S:
        raise NiftiInputError(
            f"magnitude and phase echoes differ: magnitude TE {[round(t * 1e3, 3) for t in ta]} ms, "
            f"phase TE {[round(t * 1e3, 3) for t in tb]} ms"
        )
    return mags, phases


def load_nifti_gre(folder: Path, *, phase_flip: bool = False) -> GREVolume:
    """Read dcm2niix / BIDS magnitude and phase echoes under ``folder`` into a :class:`GREVolume`.

    Raises:
        NiftiInputError: phase without magnitude, missing sidecar or EchoTime, mixed sizes, echo times
            that differ between magnitude and phase, a phase range that is no phase (one line each).
    """
    files = scan_nifti(folder)
    notes: list[str] = []
    mags, phases = _pair(files, notes)
    return _build_gre(files, mags, phases, notes, phase_flip=phase_flip, kind="nifti-gre")


# ============================================================================ precomputed QSM
def load_nifti_qsm(folder: Path) -> GREVolume:
    """A precomputed QSM map (ppm) with its magnitude echoes: a GREVolume whose ``precomputed_qsm``
    holds the map and the brain mask (a ``*mask*`` NIfTI when given, else from the magnitude as the
    QSM chain makes it, :func:`core.qsm.mask.brain_mask`).

    The magnitude is required: it places the MARS atlas (registration) and fills the key images.
    """
    from core.qsm.pipeline import QSMResult

    files = scan_nifti(folder)
    _refuse_unreadable(files)
    notes: list[str] = []
    qsm_files = files.by_kind["QSM"]
    if len(qsm_files) != 1:
        raise NiftiInputError(f"expected one QSM map, found {len(qsm_files)}: " + ", ".join(p.name for p in qsm_files))
    k = files.by_kind
    if not (k["M"] or (k["R"] and k["I"])):
        raise NiftiInputError(
            f"precomputed QSM {qsm_files[0].name} needs the GRE magnitude on the same grid (MARS registration, "
            f"key images); the folder holds {files.describe()}"
        )
    if k["P"] or k["I"]:
        notes.append("phase images ignored: the precomputed QSM map is used")
    comp = "M" if k["M"] else "R"
    mags = _echo_stack(files, comp, notes)
    if comp == "R":
        imags = _echo_stack(files, "I", notes)
        for m, i in zip(mags, imags):
            m.data = np.abs(m.data + 1j * i.data)
    qsm_vol = _read(qsm_files[0], "QSM", files.sidecars[qsm_files[0]] or {}, notes)
    if len(qsm_vol) != 1:
        raise NiftiInputError(f"{qsm_files[0].name} holds {len(qsm_vol)} volumes: a QSM map is one 3-D volume")
    _check_same_grid(mags)
    gre = _build_gre(files, mags, None, notes, phase_flip=False, kind="qsm-nifti")
    shape = gre.magnitude.shape[1:]
    chi = check_chi_ppm(_on_grid(qsm_vol[0], mags[0], gre.geometry), qsm_files[0].name)
    mask_vol = None
    if k["MASK"]:
        mask_vol = _read(k["MASK"][0], "MASK", files.sidecars[k["MASK"][0]] or {}, notes)[0]
        mask = _on_grid(mask_vol, mags[0], gre.geometry) > 0.5
        notes.append(f"brain mask from {mask_vol.path.name}")
    else:
        from core.qsm.mask import brain_mask

        mask = brain_mask(gre.magnitude, gre.geometry.spacing)
        notes.append("brain mask from the first-echo magnitude (as the QSM chain makes it)")
    if mask.shape != shape or not mask.any():
        raise NiftiInputError("the brain mask is empty or not on the QSM grid")
    gre.precomputed_qsm = QSMResult(chi, mask, mask, None, None, {"total": 0.0},
                                    method="precomputed", background="", reference=f"as provided ({qsm_files[0].name})")
    return gre


def _on_grid(vol: _Volume, ref: _Volume, geometry: Geometry) -> np.ndarray:
    """``vol``'s array in the layout of ``geometry`` (the magnitude's): a map written by another tool
    may store the same grid in another axis order (our qsm.nii.gz keeps the DICOM order, dcm2niix
    reverses two axes); it is reoriented, never resampled, and refused when the grids differ."""
    if vol.data.ndim != 3:
        raise NiftiInputError(f"{vol.path.name} is {vol.data.ndim}-D: expected one 3-D volume")
    affine, perm, flips = to_lps_grid(vol.affine_ras, vol.data.shape, ref.sidecar)
    data = _reorient(vol.data, perm, flips)
    if data.shape != tuple(geometry.shape) or np.max(np.abs(affine - geometry.affine)) > _AFFINE_TOL_MM:
        raise NiftiInputError(
            f"{vol.path.name} and {ref.path.name} lie on different grids "
            f"({'x'.join(map(str, vol.data.shape))} vs {'x'.join(map(str, ref.data.shape))} voxels or another position)"
        )
    return data.astype(np.float32)


def check_chi_ppm(chi: np.ndarray, name: str) -> np.ndarray:
    """Finite values in a ppm range, else a one-line refusal (ppb maps, field maps, phase)."""
    chi = np.asarray(chi, dtype=np.float32)
    finite = np.isfinite(chi)
    if not finite.any():
        raise NiftiInputError(f"QSM map {name} holds no finite values")
    peak = float(np.percentile(np.abs(chi[finite]), 99.9))
    if peak > QSM_MAX_ABS_PPM:
        raise NiftiInputError(
            f"QSM map {name} reaches |chi| {peak:.4g} (99.9th percentile): not ppm (ppb? a field map?); "
            f"give chi in ppm"
        )
    if peak == 0.0:
        raise NiftiInputError(f"QSM map {name} is zero everywhere")
    return np.where(finite, chi, 0.0).astype(np.float32)


# ============================================================================ source series
def synthesise_source_series(gre: GREVolume, sidecars: list[dict] | None = None) -> list[pydicom.Dataset]:
    """The first-echo magnitude as a classic MR Image Storage series (in memory, one dataset per slice).

    The SEG, SR and key images reference their source images; a NIfTI input has none, so this series
    stands in for the scanner's magnitude series (SeriesDescription says it was converted from NIfTI)
    and is written with the results. UIDs are name-based on the magnitude series UID; pixels are
    uint16, scaled to 0..4095 (RescaleSlope gives the NIfTI values back).
    """
    side = (sidecars or [{}])[0] if sidecars else {}
    g = gre.geometry
    mag = np.clip(np.asarray(gre.magnitude[0], dtype=np.float64), 0, None)
    top = float(mag.max()) or 1.0
    slope = top / 4095.0
    stored = np.rint(mag / slope).astype(np.uint16)
    now = _dt.datetime(2000, 1, 1)  # fixed: the files must not change from run to run
    base = pydicom.Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.SOPClassUID = MRImageStorage
    base.Modality = "MR"
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator"):
        setattr(base, kw, gre.patient.get(kw, ""))
    base.StudyDescription = gre.patient.get("StudyDescription", "NIfTI research input")
    base.StudyInstanceUID = gre.study_instance_uid
    base.SeriesInstanceUID = gre.magnitude_series_uid
    base.SeriesNumber = int(side.get("SeriesNumber", 1) or 1)
    base.SeriesDescription = (f"{side.get('SeriesDescription', 'GRE')} magnitude TE1, converted from NIfTI")[:64]
    base.FrameOfReferenceUID = g.frame_of_reference_uid
    base.Manufacturer = gre.manufacturer
    base.ManufacturerModelName = str(side.get("ManufacturersModelName", ""))
    base.InstitutionName = str(side.get("InstitutionName", ""))
    base.BodyPartExamined = str(side.get("BodyPartExamined", "") or "HEAD")[:16]
    base.PatientPosition = str(side.get("PatientPosition", "") or "HFS")[:16]
    base.ImageType = ["DERIVED", "PRIMARY", "M", "ND"]
    base.ScanningSequence = "GR"
    base.SequenceVariant = "NONE"
    base.ScanOptions = ""
    base.MRAcquisitionType = str(side.get("MRAcquisitionType", "3D"))
    base.RepetitionTime = f"{float(side.get('RepetitionTime', 0) or 0) * 1e3:.6g}" if side.get("RepetitionTime") else None
    base.EchoTime = f"{gre.echo_times_s[0] * 1e3:.6g}"
    base.EchoNumbers = 1
    base.EchoTrainLength = int(gre.n_echoes)
    base.MagneticFieldStrength = f"{gre.field_strength_t:.6g}"
    base.ImagingFrequency = f"{GAMMA_BAR_HZ_PER_T * gre.field_strength_t / 1e6:.9g}"[:16]
    base.DerivationDescription = "first-echo GRE magnitude converted from NIfTI by CMB-QSM (source of the results)"
    base.ImageOrientationPatient = [f"{v:.8g}" for v in g.image_orientation()]
    base.PixelSpacing = [f"{v:.8g}" for v in g.pixel_spacing()]
    base.SliceThickness = f"{g.spacing[2]:.8g}"
    base.SpacingBetweenSlices = f"{g.spacing[2]:.8g}"
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows, base.Columns = int(g.shape[1]), int(g.shape[0])
    base.BitsAllocated, base.BitsStored, base.HighBit, base.PixelRepresentation = 16, 12, 11, 0
    base.RescaleIntercept, base.RescaleSlope, base.RescaleType = "0", f"{slope:.10g}"[:16], "US"
    base.WindowCenter, base.WindowWidth = "2048", "4096"
    date = now.strftime("%Y%m%d")
    base.SeriesDate = base.ContentDate = date
    base.SeriesTime = base.ContentTime = now.strftime("%H%M%S")
    normal = g.direction[:, 2]
    out = []
    for k in range(g.shape[2]):
        ds = pydicom.Dataset()
        ds.update(base)
        ds.SOPInstanceUID = derived_uid("nifti source instance", gre.magnitude_series_uid, str(k))
        ds.InstanceNumber = k + 1
        pos = g.slice_position(k)
        ds.ImagePositionPatient = [f"{v:.10g}" for v in pos]
        ds.SliceLocation = f"{float(np.dot(pos, normal)):.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).astype("<u2").tobytes()
        out.append(ds)
    return out


def write_source_series(gre: GREVolume, out_dir: Path) -> list[Path]:
    """Write :attr:`GREVolume.source_datasets` (synthesised) as ``MAG_NNNN.dcm`` files."""
    from core.dicom.derived import explicit_le_file_meta

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in gre.source_datasets:
        ds.file_meta = explicit_le_file_meta(ds.SOPClassUID, ds.SOPInstanceUID)
        path = out_dir / f"MAG_{int(ds.InstanceNumber):04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
