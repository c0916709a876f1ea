"""NIfTI writing for arrays in the product's [i, j, k] LPS convention (stored as RAS)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from core.geometry import Geometry


def save_nifti(path: Path, data: np.ndarray, geometry: Geometry, *, dtype=np.float32) -> Path:
    """Write ``data`` ([i, j, k] or [i, j, k, t]) with the geometry's RAS affine."""
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), geometry.nifti_affine())
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(geometry.nifti_affine(), code=1)
    img.header.set_sform(geometry.nifti_affine(), code=1)
    nib.save(img, str(path))
    return Path(path)


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return (data, RAS affine)."""
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine
