"""Brain mask from GRE magnitude, and mask erosion in millimetres.

Method (our own robust simplification of BET, Smith, Hum. Brain Mapp. 2002;17:143; BET's robust
range ``t2``/``t98`` and "threshold between background and brain" idea, without the deformable mesh):

1. The first echo's magnitude (least T2* dephasing near sinuses; on our phantom it gave a slightly
   better Dice than the root-sum-of-squares of all echoes), smoothed (Gaussian, ``smooth_mm``).
2. Background level ``b`` = median of the voxels below Otsu's threshold; brain level ``t`` = median
   inside the largest component of (Otsu foreground eroded by ``bridge_mm``), i.e. the brain's core,
   not the scalp; foreground = ``m > b + threshold_fraction * (t - b)``. With 0.5 the boundary sits
   at the half-height of the blurred brain/bone step, where partial volume puts it.
3. Erode by ``bridge_mm`` (distance transform, anisotropic voxels handled), keep the largest
   connected component (the brain; scalp is a thin shell cut off by the dark bone gap), grow it back
   by the same distance inside the foreground (a geodesic-free reconstruction, good enough because
   the bone gap is thicker than the growth back).
4. Refinement of the surface: fill holes, morphological closing by ``close_mm`` (dark sulcal veins
   and iron-rich cortex near the surface), fill holes again, and smooth the surface (Gaussian of the
   mask at ``smooth_mm``, thresholded at 0.5).

Dark structures inside the brain (veins, haemorrhage, deep grey matter on late echoes) are kept by
hole filling. Units: millimetres for every size; works on anisotropic voxels.

Written by hand: the only Python BET port (``brainextractor``) brings numba; deep-learning skull
strippers are trained on T1 and download weights. scipy.ndimage does the filtering.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from core.errors import ReconstructionError


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def distance_mm(mask: np.ndarray, spacing_mm: Sequence[float], *, border_outside: bool) -> np.ndarray:
    """Euclidean distance (mm, float32) from each voxel of ``mask`` to the nearest voxel outside it,
    0 outside; with ``border_outside`` the space beyond the array counts as outside too.

    The ``edt`` package (Zlateski & Seung's linear-time anisotropic EDT): the same distances as
    ``scipy.ndimage.distance_transform_edt`` (to 5e-7 mm, tested) about 8x faster, which matters
    because the QSM chain takes some ten transforms of the whole brain (1.5 s of scipy each at 1 mm).
    """
    import edt

    m = np.ascontiguousarray(mask, dtype=bool)
    if not m.any():
        return np.zeros(m.shape, np.float32)
    return edt.edt(m, anisotropy=tuple(float(s) for s in spacing_mm), black_border=border_outside,
                   parallel=1)


def _distance_inside(
    mask: np.ndarray, spacing_mm: Sequence[float], border_inside: bool = False
) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside (array border = outside
    unless ``border_inside``)."""
    return distance_mm(mask, spacing_mm, border_outside=not border_inside)


def erode_mask(
    mask: np.ndarray, mm: float, spacing_mm: Sequence[float], *, border_inside: bool = False
) -> np.ndarray:
    """Voxels whose ball of radius ``mm`` lies inside ``mask``.

    The array border counts as outside, unless ``border_inside`` (used for closing, where the mask
    may run off the array).
    """
    mask = np.asarray(mask, dtype=bool)
    if mm <= 0:
        return mask.copy()
    return _distance_inside(mask, spacing_mm, border_inside) > mm


def dilate_mask(mask: np.ndarray, mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    """Voxels within ``mm`` of ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if mm <= 0:
        return mask.copy()
    if not mask.any():
        return mask.copy()
    return distance_mm(~mask, spacing_mm, border_outside=False) <= mm


def _largest_core(fg: np.ndarray, bridge_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Largest connected component of ``fg`` eroded by ``bridge_mm``.

    Computed on every second voxel (8x fewer for the distance transform) when the volume is large
    enough, then brought back to full size (nearest neighbour) and intersected with ``fg``; the
    up-to-one-voxel blockiness is absorbed by the growth back in :func:`brain_mask`.
    """
    step = 2 if min(fg.shape) >= 48 else 1
    small = fg[::step, ::step, ::step]
    core = erode_mask(small, bridge_mm, spacing * step)
    labels, n = ndi.label(core)
    if n == 0:
        raise ReconstructionError("no brain found in the magnitude image (nothing thicker than a few mm)")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    core = labels == int(np.argmax(sizes))
    if step > 1:
        for ax in range(3):
            core = np.repeat(core, step, axis=ax)
        core = core[: fg.shape[0], : fg.shape[1], : fg.shape[2]]
    return core & fg


def _boxed(mask: np.ndarray, margin_mm: float, spacing: np.ndarray, fn) -> np.ndarray:
    """Apply a morphological ``fn`` to the bounding box of ``mask`` grown by ``margin_mm`` only."""
    margin = [int(np.ceil(margin_mm / d)) + 2 for d in spacing]
    out = np.zeros_like(mask)
    if not mask.any():
        return out
    box = []
    for ax in range(3):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))
        box.append(slice(max(idx[0] - margin[ax], 0), min(idx[-1] + 1 + margin[ax], mask.shape[ax])))
    box = tuple(box)
    out[box] = fn(mask[box])
    return out


def brain_mask(
    magnitude: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    threshold_fraction: float = 0.5,
    bridge_mm: float = 3.0,
    close_mm: float = 4.0,
    smooth_mm: float = 1.0,
) -> np.ndarray:
    """Boolean brain mask ``[i, j, k]`` from magnitude ``[i, j, k]`` or ``[e, i, j, k]``.

    Raises:
        ReconstructionError: the magnitude is constant, not finite, or no brain-sized object is found.
    """
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim == 4:
        mag = mag[0]
    if mag.ndim != 3:
        raise ReconstructionError(f"magnitude must be 3-D or 4-D, got shape {mag.shape}")
    if not np.all(np.isfinite(mag)):
        raise ReconstructionError("magnitude image contains NaN or infinite values; cannot find the brain")
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    sigma = smooth_mm / spacing
    img = ndi.gaussian_filter(mag, sigma=sigma) if smooth_mm > 0 else mag
    lo, hi = np.percentile(img, [0.5, 99.5])
    if hi - lo <= 1e-6 * max(abs(hi), 1e-12):
        raise ReconstructionError("magnitude image is constant; cannot find the brain")
    img = np.clip(img, lo, hi)
    t_otsu = _otsu(img.ravel())
    bg = float(np.median(img[img <= t_otsu]))
    first = _largest_core(img > t_otsu, bridge_mm, spacing)
    tissue = float(np.median(img[first]))
    fg = img > bg + threshold_fraction * (tissue - bg)
    core = _largest_core(fg, bridge_mm, spacing)
    grow = bridge_mm + 1.5 * float(spacing.max())
    brain = _boxed(core, grow, spacing, lambda m: dilate_mask(m, grow, spacing)) & fg

    brain = ndi.binary_fill_holes(brain)
    if close_mm > 0:
        closed = _boxed(
            brain, close_mm, spacing,
            lambda m: erode_mask(dilate_mask(m, close_mm, spacing), close_mm, spacing, border_inside=True),
        )
        brain = ndi.binary_fill_holes(closed | brain)
    if smooth_mm > 0:
        brain = ndi.gaussian_filter(brain.astype(np.float32), sigma=sigma) > 0.5
    labels, n = ndi.label(brain)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        brain = labels == int(np.argmax(sizes))
    return brain


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * np.logical_and(a, b).sum() / s)
