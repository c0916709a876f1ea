"""Accuracy metrics for QSM against a known susceptibility map (simulation ground truth).

Definitions follow the QSM reconstruction challenges / QSM-CI so that figures are comparable:

* :func:`nrmse` (%):  ``100 * ||(r - mean r) - (t - mean t)|| / ||t - mean t||`` over the mask
  (both maps referenced to their own mean inside the mask; QSM-CI's "NRMSE demeaned").
* :func:`hfen` (%): high-frequency error norm, ``100 * ||LoG(r) - LoG(t)|| / ||LoG(t)||`` with a
  Laplacian-of-Gaussian of sigma 1.5 voxels (Ravishankar & Bresler 2011; QSM challenge 2016),
  applied to the demeaned maps set to 0 outside the mask, norms taken inside the mask.
* :func:`xsim`: XSIM (Milovic et al. 2019, QSM challenge 2.0): SSIM with K1 = 0.01, K2 = 0.001,
  a 5 x 5 x 5 box window (sample covariances), data range ``max(t) - min(t)`` inside the mask, on
  the maps set to 0 outside the mask, averaged over the mask. 1 for identical maps.
* :func:`roi_means`: mean susceptibility per labelled structure (deep grey matter).
* :func:`contrast_recovery`: mean recon / mean truth inside a sphere (microbleeds).
* :func:`streaking`: QSM challenge 2.0 calcification streaking: standard deviation of the error
  ``r - t`` in a rim around the calcification (from 1 mm to 6 mm outside its surface) divided by
  ``|mean truth inside the calcification|``. The error, not ``r`` itself, so the anatomy around the
  calcification does not count as streaking.
* :func:`dice`: ``2 |A & B| / (|A| + |B|)``.

All functions take numpy arrays on the same grid; distances use ``spacing`` (mm) where relevant.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

HFEN_SIGMA_VOXELS = 1.5
XSIM_WINDOW = 5
XSIM_K1 = 0.01
XSIM_K2 = 0.001
RIM_GAP_MM = 1.0
RIM_WIDTH_MM = 5.0


def _check(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if recon.shape != truth.shape or truth.shape != mask.shape:
        raise ValueError(f"shapes differ: recon {recon.shape}, truth {truth.shape}, mask {mask.shape}")
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("mask is empty")
    return m


def _demeaned(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.where(m, a - a[m].mean(), 0.0)


def nrmse(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """QSM-CI demeaned NRMSE in percent inside ``mask``."""
    m = _check(recon, truth, mask)
    r, t = _demeaned(recon, m)[m], _demeaned(truth, m)[m]
    den = np.linalg.norm(t)
    if den == 0:
        raise ValueError("truth is constant inside the mask; NRMSE undefined")
    return float(100.0 * np.linalg.norm(r - t) / den)


def hfen(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, sigma: float = HFEN_SIGMA_VOXELS) -> float:
    """High-frequency error norm in percent (LoG sigma in voxels)."""
    m = _check(recon, truth, mask)
    lr = ndimage.gaussian_laplace(_demeaned(recon, m), sigma)
    lt = ndimage.gaussian_laplace(_demeaned(truth, m), sigma)
    den = np.linalg.norm(lt[m])
    if den == 0:
        raise ValueError("truth has no high-frequency content inside the mask; HFEN undefined")
    return float(100.0 * np.linalg.norm((lr - lt)[m]) / den)


def xsim(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, window: int = XSIM_WINDOW,
         k1: float = XSIM_K1, k2: float = XSIM_K2, data_range: float | None = None) -> float:
    """XSIM (SSIM with QSM-tuned constants) averaged over ``mask``; 1 for identical maps."""
    m = _check(recon, truth, mask)
    return float(xsim_map(recon, truth, m, window, k1, k2, data_range)[m].mean())


def xsim_map(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, window: int = XSIM_WINDOW,
             k1: float = XSIM_K1, k2: float = XSIM_K2, data_range: float | None = None) -> np.ndarray:
    """Local XSIM of the maps set to 0 outside ``mask`` (every voxel of the grid)."""
    m = _check(recon, truth, mask)
    x = np.where(m, np.asarray(recon, dtype=np.float64), 0.0)
    y = np.where(m, np.asarray(truth, dtype=np.float64), 0.0)
    if data_range is None:
        data_range = float(y[m].max() - y[m].min())
    if data_range <= 0:
        raise ValueError("truth is constant inside the mask; XSIM data range is 0")
    n = float(window ** 3)
    cov = n / (n - 1.0)

    def f(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=window, mode="reflect")

    ux, uy = f(x), f(y)
    vx = cov * (f(x * x) - ux * ux)
    vy = cov * (f(y * y) - uy * uy)
    vxy = cov * (f(x * y) - ux * uy)
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))


def roi_means(chi: np.ndarray, labels: np.ndarray, codes: dict[str, int],
              mask: np.ndarray | None = None) -> dict[str, float]:
    """Mean of ``chi`` per structure ``name -> label code`` (restricted to ``mask`` if given).

    Structures with no voxel are left out.
    """
    out: dict[str, float] = {}
    for name, code in codes.items():
        sel = labels == code
        if mask is not None:
            sel &= mask
        if sel.any():
            out[name] = float(np.mean(chi[sel], dtype=np.float64))
    return out


def sphere_mask(shape: Sequence[int], centre_voxel: Sequence[float], radius_mm: float,
                spacing: Sequence[float]) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_voxel`` (voxel coordinates)."""
    return distance_map(shape, centre_voxel, spacing) <= radius_mm


def distance_map(shape: Sequence[int], centre_voxel: Sequence[float], spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) of every voxel centre from ``centre_voxel``."""
    grids = np.ogrid[tuple(slice(0, int(n)) for n in shape)]
    d2 = sum(((g - float(c)) * float(s)) ** 2 for g, c, s in zip(grids, centre_voxel, spacing))
    return np.sqrt(d2)


def contrast_recovery(recon: np.ndarray, truth: np.ndarray, region: np.ndarray) -> float:
    """``mean(recon) / mean(truth)`` inside ``region`` (1 = full recovery)."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        raise ValueError("empty lesion region")
    mt = float(np.mean(truth[region], dtype=np.float64))
    if mt == 0:
        raise ValueError("truth mean is 0 inside the lesion; contrast recovery undefined")
    return float(np.mean(recon[region], dtype=np.float64) / mt)


def streaking(recon: np.ndarray, truth: np.ndarray, centre_voxel: Sequence[float], radius_mm: float,
              spacing: Sequence[float], mask: np.ndarray | None = None,
              gap_mm: float = RIM_GAP_MM, width_mm: float = RIM_WIDTH_MM) -> float:
    """Calcification streaking: SD of ``recon - truth`` in the rim / ``|mean truth in the calcification|``.

    Rim: voxels from ``radius + gap`` to ``radius + gap + width`` mm from the centre (inside ``mask``
    if given). Both maps should share their reference (e.g. both demeaned over the same mask).
    """
    d = distance_map(truth.shape, centre_voxel, spacing)
    inside = d <= radius_mm
    rim = (d > radius_mm + gap_mm) & (d <= radius_mm + gap_mm + width_mm)
    if mask is not None:
        rim &= mask
    if not inside.any() or rim.sum() < 2:
        raise ValueError("calcification or its rim has no voxels on this grid")
    mt = abs(float(np.mean(truth[inside], dtype=np.float64)))
    if mt == 0:
        raise ValueError("truth mean is 0 inside the calcification")
    err = np.asarray(recon, dtype=np.float64)[rim] - np.asarray(truth, dtype=np.float64)[rim]
    return float(np.std(err) / mt)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (1.0 when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)
