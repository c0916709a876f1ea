"""The hand-crafted baseline of the reference method's Table 2 (Xia et al. 2023).

A CMB candidate component (a connected binary region, e.g. the thresholded FRST around a candidate)
is kept when its volume, its length and its fractional anisotropy (FA) are all below thresholds:
CMBs are small and round, veins are long and thin. The paper gives neither the thresholds nor the
exact feature definitions; ours are:

* volume_mm3 = number of voxels x voxel volume.
* length_mm = largest extent of the component along its principal axis: the range of the voxel
  centres' projections on the eigenvector of the largest inertia eigenvalue, plus one voxel's
  extent along that axis (so one voxel has length ~ its size).
* FA of the second-moment (inertia / covariance) matrix C of the voxel positions in mm (each voxel
  as a uniform box, adding spacing^2 / 12 per axis, so a single voxel is isotropic for cubic
  voxels): with eigenvalues l1, l2, l3,
      FA = sqrt(1/2) sqrt((l1 - l2)^2 + (l2 - l3)^2 + (l3 - l1)^2) / sqrt(l1^2 + l2^2 + l3^2),
  0 for a sphere, -> 1 for a line.

Default thresholds (our choice, for CMBs of 2-10 mm diameter): volume <= 524 mm^3 (a 10 mm
sphere), length <= 10 mm, FA <= 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.detect import DetectionError


@dataclass(frozen=True)
class ComponentFeatures:
    volume_mm3: float
    length_mm: float
    fa: float


def component_features(component: np.ndarray, spacing_mm: Sequence[float]) -> ComponentFeatures:
    """Volume, length and fractional anisotropy of one binary 3-D component (see module docstring)."""
    comp = np.asarray(component, dtype=bool)
    if comp.ndim != 3:
        raise DetectionError(f"candidate component must be 3-D, got {comp.ndim}-D")
    idx = np.argwhere(comp)
    if len(idx) == 0:
        raise DetectionError("candidate component is empty")
    sp = np.asarray(spacing_mm, dtype=float)
    pts = idx * sp
    volume = float(len(idx) * np.prod(sp))
    cov = np.cov(pts.T, bias=True) if len(idx) > 1 else np.zeros((3, 3))
    cov = cov + np.diag(sp**2 / 12.0)
    evals, evecs = np.linalg.eigh(cov)
    l1, l2, l3 = evals[::-1]
    denom = np.sqrt(l1**2 + l2**2 + l3**2)
    fa = float(np.sqrt(0.5) * np.sqrt((l1 - l2) ** 2 + (l2 - l3) ** 2 + (l3 - l1) ** 2) / denom)
    axis = evecs[:, -1]
    proj = pts @ axis
    length = float(proj.max() - proj.min() + np.abs(axis * sp).sum() / np.linalg.norm(axis))
    return ComponentFeatures(volume_mm3=volume, length_mm=length, fa=fa)


def passes_handcrafted(
    features: ComponentFeatures,
    max_volume_mm3: float = 524.0,
    max_length_mm: float = 10.0,
    max_fa: float = 0.5,
) -> tuple[bool, bool, bool]:
    """The three successive tests of Table 2: (volume ok, volume and length ok, all three ok)."""
    v = features.volume_mm3 <= max_volume_mm3
    vl = v and features.length_mm <= max_length_mm
    return v, vl, vl and features.fa <= max_fa
