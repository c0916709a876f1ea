"""The one geometry type that travels with every volume, and the only voxel <-> patient conversion.

Conventions (used everywhere in the product):

* Arrays are indexed ``[i, j, k]`` (a 4-D echo stack ``[e, i, j, k]``), where ``i`` runs along the
  DICOM row direction (first vector of ImageOrientationPatient, i.e. across a row = column index),
  ``j`` along the column direction (second vector of ImageOrientationPatient = row index) and ``k``
  along the slice normal ``row x col``. A DICOM ``pixel_array`` (rows, columns) is therefore
  transposed into ``[i, j]``. This is also the NIfTI / ITK order (x fastest).
* Patient coordinates are DICOM LPS millimetres (x to the patient's Left, y to Posterior, z to
  Superior). NIfTI files store RAS; :meth:`Geometry.nifti_affine` converts.
* ``affine`` maps a voxel index ``(i, j, k, 1)`` to ``(x, y, z, 1)`` in LPS mm. Its 3x3 part is
  ``direction @ diag(spacing)`` with orthonormal columns of ``direction`` (no shear: DICOM image
  planes are orthogonal grids; an acquisition with gantry tilt is refused by the loader).
* B0 points along +z of the scanner, which for a head-first supine patient is LPS +z (superior). Its
  direction in the array frame, :meth:`Geometry.b0_direction_ijk`, is what the dipole kernel needs
  for oblique slices. DICOM's patient frame follows the PatientPosition the operator entered, so the
  bore axis is the patient's head-foot axis for every head-first / feet-first position (supine,
  prone, decubitus): B0 stays along LPS z (feet-first reverses its sign, which the dipole kernel,
  quadratic in B0, does not see). Only the left-, right-, anterior- and posterior-first positions
  put another patient axis along the bore (:func:`b0_direction_for_position`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

# PatientPosition (PS3.3 C.7.3.1.1.2) -> the LPS direction of the body part that enters the bore
# first, i.e. where B0 points (HF: superior, FF: inferior, LF: left, RF: right, AF: anterior, PF: posterior)
_FIRST_PART_LPS = {"HF": (0.0, 0.0, 1.0), "FF": (0.0, 0.0, -1.0), "LF": (1.0, 0.0, 0.0),
                   "RF": (-1.0, 0.0, 0.0), "AF": (0.0, -1.0, 0.0), "PF": (0.0, 1.0, 0.0)}
_POSITION_TERMS = {"HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS",
                   "LFP", "LFS", "RFP", "RFS", "AFDR", "AFDL", "PFDR", "PFDL"}


def b0_direction_for_position(patient_position: str | None) -> tuple[tuple[float, float, float], str | None]:
    """The LPS direction of B0 for a DICOM PatientPosition, and a note when it is not HFS.

    Missing or unknown values are read as head first (the note says so): every brain protocol on a
    closed-bore scanner is head first or feet first, and both give the same dipole kernel.
    """
    pp = (patient_position or "").strip().upper()
    if pp not in _POSITION_TERMS:
        note = (f"PatientPosition {pp!r} is not a DICOM defined term: B0 taken along the head-foot axis"
                if pp else None)
        return _FIRST_PART_LPS["HF"], note
    direction = _FIRST_PART_LPS[pp[:2]]
    if pp == "HFS":
        return direction, None
    axis = {"HF": "head-foot", "FF": "head-foot", "LF": "left-right", "RF": "left-right",
            "AF": "anterior-posterior", "PF": "anterior-posterior"}[pp[:2]]
    return direction, f"PatientPosition {pp}: B0 along the patient's {axis} axis"


@dataclass(frozen=True)
class Geometry:
    """Shape, voxel spacing and position of a 3-D volume in the patient (LPS) frame.

    Args:
        shape: number of voxels along ``(i, j, k)``.
        affine: 4x4 voxel-index -> LPS mm matrix.
        frame_of_reference_uid: DICOM FrameOfReferenceUID the coordinates belong to.
        b0_direction_lps: unit vector of the main field in LPS (default superior, +z).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    frame_of_reference_uid: str | None = None
    b0_direction_lps: tuple[float, float, float] = (0.0, 0.0, 1.0)
    _inv: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {affine.shape}")
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise ValueError(f"shape must be three positive integers, got {self.shape}")
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise ValueError("affine has a zero-length axis")
        direction = affine[:3, :3] / spacing
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise ValueError("affine axes are not orthogonal (sheared or tilted grid)")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        b0 = np.asarray(self.b0_direction_lps, dtype=np.float64)
        object.__setattr__(self, "b0_direction_lps", tuple(float(v) for v in b0 / np.linalg.norm(b0)))
        object.__setattr__(self, "_inv", np.linalg.inv(affine))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_parameters(
        cls,
        shape: Sequence[int],
        spacing_mm: Sequence[float],
        origin_lps: Sequence[float] = (0.0, 0.0, 0.0),
        direction: np.ndarray | None = None,
        frame_of_reference_uid: str | None = None,
    ) -> "Geometry":
        """Build from spacing, origin (centre of voxel 0,0,0) and a 3x3 direction matrix.

        ``direction``'s columns are the unit vectors of the i, j and k axes in LPS.
        """
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        affine = np.eye(4)
        affine[:3, :3] = d @ np.diag(np.asarray(spacing_mm, dtype=np.float64))
        affine[:3, 3] = np.asarray(origin_lps, dtype=np.float64)
        return cls(tuple(shape), affine, frame_of_reference_uid)

    @classmethod
    def from_dicom(
        cls,
        rows: int,
        columns: int,
        image_orientation: Sequence[float],
        first_position: Sequence[float],
        pixel_spacing: Sequence[float],
        slice_spacing_mm: float,
        n_slices: int,
        frame_of_reference_uid: str | None = None,
    ) -> "Geometry":
        """Build from DICOM image-plane attributes of the first slice of a sorted stack.

        ``pixel_spacing`` is DICOM PixelSpacing: (spacing between rows, spacing between columns),
        i.e. (along j, along i). ``slice_spacing_mm`` is the signed distance between consecutive
        slice centres along ``row x col``; it must be positive for a stack sorted by position.
        """
        row = np.asarray(image_orientation[:3], dtype=np.float64)
        col = np.asarray(image_orientation[3:6], dtype=np.float64)
        row /= np.linalg.norm(row)
        col /= np.linalg.norm(col)
        normal = np.cross(row, col)
        direction = np.stack([row, col, normal], axis=1)
        spacing = (float(pixel_spacing[1]), float(pixel_spacing[0]), float(slice_spacing_mm))
        return cls.from_parameters(
            (columns, rows, n_slices), spacing, first_position, direction, frame_of_reference_uid
        )

    @classmethod
    def oblique(
        cls,
        shape: Sequence[int],
        spacing_mm: Sequence[float],
        tilt_deg: float = 0.0,
        centre_lps: Sequence[float] = (0.0, 0.0, 0.0),
        frame_of_reference_uid: str | None = None,
    ) -> "Geometry":
        """An axial stack tilted by ``tilt_deg`` about the left-right axis, centred on a point.

        ``tilt_deg = 0`` gives the usual axial acquisition: i to the patient's left, j posterior,
        k superior. A positive tilt rotates the slice plane (like an AC-PC angulation).
        """
        t = np.deg2rad(tilt_deg)
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        direction = rot
        spacing = np.asarray(spacing_mm, dtype=np.float64)
        half = (np.asarray(shape, dtype=np.float64) - 1) / 2.0
        origin = np.asarray(centre_lps, dtype=np.float64) - direction @ (spacing * half)
        return cls.from_parameters(shape, spacing, origin, direction, frame_of_reference_uid)

    # ------------------------------------------------------------------ properties
    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along (i, j, k) in mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the i, j, k unit vectors in LPS."""
        return self.affine[:3, :3] / np.asarray(self.spacing)

    @property
    def origin(self) -> np.ndarray:
        """LPS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))

    def b0_direction_ijk(self) -> np.ndarray:
        """Unit vector of B0 expressed along the array axes (i, j, k)."""
        return self.direction.T @ np.asarray(self.b0_direction_lps)

    # ------------------------------------------------------------------ conversions
    def voxel_to_patient(self, ijk: np.ndarray | Sequence[float]) -> np.ndarray:
        """Voxel indices (..., 3), fractional allowed, -> LPS mm (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def patient_to_voxel(self, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
        """LPS mm (..., 3) -> fractional voxel indices (..., 3)."""
        p = np.asarray(xyz, dtype=np.float64)
        return p @ self._inv[:3, :3].T + self._inv[:3, 3]

    def nifti_affine(self) -> np.ndarray:
        """The voxel -> RAS affine to store in a NIfTI header for arrays in [i, j, k] order."""
        return LPS_TO_RAS @ self.affine

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient (LPS mm) of slice ``k``: the centre of voxel (0, 0, k)."""
        return self.voxel_to_patient([0.0, 0.0, float(k)])

    def image_orientation(self) -> list[float]:
        """DICOM ImageOrientationPatient (row direction, column direction)."""
        d = self.direction
        return [float(v) for v in np.concatenate([d[:, 0], d[:, 1]])]

    def pixel_spacing(self) -> list[float]:
        """DICOM PixelSpacing: (between rows = along j, between columns = along i)."""
        s = self.spacing
        return [s[1], s[0]]

    def snapped(self) -> "Geometry":
        """This grid with its affine through :func:`snap_affine` (both readers, DICOM and NIfTI, use it)."""
        return Geometry(self.shape, snap_affine(self.affine), self.frame_of_reference_uid, self.b0_direction_lps)

    def with_frame_of_reference(self, uid: str) -> "Geometry":
        return Geometry(self.shape, self.affine, uid, self.b0_direction_lps)

    def describe(self) -> dict:
        """JSON-friendly summary (for summaries and logs)."""
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(v, 6) for v in self.spacing],
            "origin_lps_mm": [round(float(v), 4) for v in self.origin],
            "direction": np.round(self.direction, 6).tolist(),
            "b0_direction_ijk": np.round(self.b0_direction_ijk(), 6).tolist(),
            "frame_of_reference_uid": self.frame_of_reference_uid,
        }


def snap_affine(affine: np.ndarray) -> np.ndarray:
    """The affine with the float noise of its voxel size removed: spacing rounded to 1e-5 mm,
    direction cosines below 1e-6 set to 0 (columns renormalised); the origin is kept.

    The same acquisition read from DICOM (slice spacing = mean of position differences of decimal
    strings: 3.9999999995 for 4 mm) and from NIfTI (float32: 4.0000005) must give the same grid:
    the QSM chain's erosions by a whole number of voxels otherwise flip boundary voxels (measured on
    a 4 mm study: chi up to 0.005 ppm apart, then different findings). The changes are far below any
    scanner's precision.
    """
    a = np.asarray(affine, dtype=np.float64)
    norms = np.linalg.norm(a[:3, :3], axis=0)
    d = a[:3, :3] / norms
    d = np.where(np.abs(d) < 1e-6, 0.0, d)
    d = d / np.linalg.norm(d, axis=0)
    out = a.copy()
    out[:3, :3] = d * np.round(norms, 5)
    return out
