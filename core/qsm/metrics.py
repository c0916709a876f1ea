"""Accuracy metrics for QSM against a known susceptibility map (simulation ground truth).

:func:`nrmse`, :func:`nrmse_detrend`, :func:`hfen`, :func:`xsim` and :func:`correlation` are the
QSM-CI scorer's (``qsm_ci.qsm_eval`` 0.6.2, itself a port of QSM.rs ``tests/common/mod.rs``), on
the same convention as its ``score_arrays``: both maps are set to 0 outside the mask (and the
reconstruction's non-finite voxels to 0) before anything is computed, so a number here is the
number QSM-CI would publish for the same arrays (``tests/unit/test_qsm_metrics.py`` checks it
against the installed package). Written here rather than imported so the product does not depend
on a challenge's command-line package; the definitions:

* :func:`nrmse` (%): ``100 * ||(r - mean r) - (t - mean t)|| / ||t - mean t||`` over the mask
  (each map referenced to its own mean inside the mask; QSM-CI's ``nrmse``).
* :func:`nrmse_detrend` (%): the same after the least-squares line ``r = a t + b`` is undone
  (``(r - b) / a``): what is left once a global scale error is forgiven.
* :func:`hfen` (%): ``100 * ||LoG(r) - LoG(t)|| / ||LoG(t)||``, LoG of sigma 1.5 voxels (truncated
  at 5 sigma) over the whole grid of the zeroed maps, norms inside the mask (2016 QSM challenge).
  Not demeaned: an offset between the maps shows at the mask's edge and counts.
* :func:`xsim`: XSIM (Milovic et al. 2019) as QSM-CI computes it: SSIM with ``L = 1`` (ppm, not
  the data range), ``K1 = 0.01``, ``K2 = 0.001`` (``C1 = 1e-4``, ``C2 = 1e-6`` ppm^2), 5 x 5 x 5
  box windows truncated at the grid's border (only in-grid voxels count), population (1/n)
  variances, averaged over the mask voxels whose denominator is positive. 1 for identical maps.
  (Until 2026-12 this module scaled the constants by the truth's range and used sample
  covariances, which is not QSM-CI's XSIM although the docstring said so.)
* :func:`correlation`: Pearson correlation inside the mask.
* :func:`roi_means`: mean susceptibility per labelled structure (deep grey matter).
* :func:`contrast_recovery`: mean recon / mean truth inside a sphere (microbleeds).
* :func:`streaking`: QSM challenge 2.0 calcification streaking: standard deviation of the error
  ``r - t`` in a rim around the calcification (from 1 mm to 6 mm outside its surface) divided by
  ``|mean truth inside the calcification|``. The error, not ``r`` itself, so the anatomy around the
  calcification does not count as streaking. (Ours; QSM-CI's ``calc_streak`` needs its phantom's
  segmentation labels.)
* :func:`dice`: ``2 |A & B| / (|A| + |B|)``.

All functions take numpy arrays on the same grid; distances use ``spacing`` (mm) where relevant.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

HFEN_SIGMA_VOXELS = 1.5
HFEN_TRUNCATE = 5.0
XSIM_WINDOW = 5
XSIM_C1 = 1e-4  # (K1 L)^2 with K1 = 0.01, L = 1 ppm
XSIM_C2 = 1e-6  # (K2 L)^2 with K2 = 0.001
RIM_GAP_MM = 1.0
RIM_WIDTH_MM = 5.0


def _check(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if recon.shape != truth.shape or truth.shape != mask.shape:
        raise ValueError(f"shapes differ: recon {recon.shape}, truth {truth.shape}, mask {mask.shape}")
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        raise ValueError("mask is empty")
    return m


def _scored(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray):
    """QSM-CI's convention: (mask, recon, truth) with both maps 0 outside the mask (float64)."""
    m = _check(recon, truth, mask)
    r = np.asarray(recon, dtype=np.float64)
    r = np.where(m & np.isfinite(r), r, 0.0)
    t = np.where(m, np.asarray(truth, dtype=np.float64), 0.0)
    return m, r, t


def _demeaned_in(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    v = a[m]
    return v - v.mean()


def _demeaned_pair(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray):
    """(recon, truth) inside the mask, each minus its own mean there, and the truth's norm (> 0)."""
    m, r, t = _scored(recon, truth, mask)
    rv, tv = _demeaned_in(r, m), _demeaned_in(t, m)
    den = np.linalg.norm(tv)
    if den == 0:
        raise ValueError("truth is constant inside the mask; NRMSE undefined")
    return rv, tv, den


def nrmse(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """QSM-CI demeaned NRMSE in percent inside ``mask``."""
    rv, tv, den = _demeaned_pair(recon, truth, mask)
    return float(100.0 * np.linalg.norm(rv - tv) / den)


def nrmse_detrend(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """QSM-CI detrended NRMSE (%): NRMSE after undoing the least-squares line recon = a truth + b."""
    rv, tv, den = _demeaned_pair(recon, truth, mask)
    slope, intercept = np.polyfit(tv, rv, 1)
    if abs(slope) < 1e-30:
        return float(100.0 * np.linalg.norm(rv - tv) / den)
    return float(100.0 * np.linalg.norm((rv - intercept) / slope - tv) / den)


def correlation(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of the two maps inside ``mask`` (0 when either is constant there)."""
    m, r, t = _scored(recon, truth, mask)
    rv, tv = _demeaned_in(r, m), _demeaned_in(t, m)
    den = np.linalg.norm(rv) * np.linalg.norm(tv)
    return float(rv @ tv / den) if den > 0 else 0.0


def hfen(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray, sigma: float = HFEN_SIGMA_VOXELS) -> float:
    """High-frequency error norm in percent (LoG sigma in voxels), QSM-CI's definition."""
    m, r, t = _scored(recon, truth, mask)
    lr = ndimage.gaussian_laplace(r, sigma, truncate=HFEN_TRUNCATE)
    lt = ndimage.gaussian_laplace(t, sigma, truncate=HFEN_TRUNCATE)
    den = np.linalg.norm(lt[m])
    if den == 0:
        raise ValueError("truth has no high-frequency content inside the mask; HFEN undefined")
    return float(100.0 * np.linalg.norm((lr - lt)[m]) / den)


def xsim(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """XSIM as QSM-CI computes it, averaged over ``mask``; 1 for identical maps."""
    m = _check(recon, truth, mask)
    local, valid = _xsim_local(recon, truth, m)
    sel = m & valid
    return float(local[sel].mean()) if sel.any() else 0.0


def xsim_map(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Local XSIM of the maps set to 0 outside ``mask`` (every voxel of the grid; NaN where undefined)."""
    m = _check(recon, truth, mask)
    local, valid = _xsim_local(recon, truth, m)
    return np.where(valid, local, np.nan)


def _xsim_local(recon: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, x, y = _scored(recon, truth, mask)
    k = XSIM_WINDOW

    def mean(a: np.ndarray) -> np.ndarray:  # mean over the in-grid part of each window
        return ndimage.uniform_filter(a, size=k, mode="constant", cval=0.0) / count

    count = ndimage.uniform_filter(np.ones_like(x), size=k, mode="constant", cval=0.0)
    ux, uy = mean(x), mean(y)
    vx = mean(x * x) - ux * ux
    vy = mean(y * y) - uy * uy
    vxy = mean(x * y) - ux * uy
    num = (2 * ux * uy + XSIM_C1) * (2 * vxy + XSIM_C2)
    den = (ux * ux + uy * uy + XSIM_C1) * (vx + vy + XSIM_C2)
    valid = den > 0
    return np.divide(num, den, out=np.zeros_like(num), where=valid), valid


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
