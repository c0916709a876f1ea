"""Stage I of the reference method (Xia et al. 2023): from a QSM volume to CMB candidates.

Steps (paper section "Brain Edge Removal, FRST CMB Detection, and Frangi Vesselness"):

1. ``erode_brain_mask``: a 3-D erosion of the brain mask by 5 voxels removes vessel-like mimics at
   the brain edge (13 % fewer candidates in the paper, no true CMB lost).
2. ``find_candidates``: local maxima of the normalised 2.5D FRST (``core.detect.frst``) above 0.5
   inside the eroded mask (threshold to be calibrated: see ``find_candidates``).
3. ``extract_cubes``: 7x7x7 cubes of the FRST (or QSM) around each candidate; ``cube_shapes``:
   each cube thresholded at 0.5 of its own maximum.
4. ``ConvScreen``: the paper's one-convolution-layer classifier of FRST cubes (CMB vs vessel).
5. ``frangi_vesselness``: Frangi et al. 1998 vesselness on QSM, via ``skimage.filters.frangi``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from core.detect import DetectionError


def erode_brain_mask(mask: np.ndarray, voxels: int = 5) -> np.ndarray:
    """Erode a 3-D brain mask by ``voxels`` voxels (6-connected structuring element, iterated).

    Voxels outside the array count as background, so the mask also shrinks away from the array's
    border.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 3:
        raise DetectionError(f"brain mask must be 3-D, got {m.ndim}-D")
    if voxels <= 0:
        return m.copy()
    return ndimage.binary_erosion(m, structure=ndimage.generate_binary_structure(3, 1),
                                  iterations=int(voxels), border_value=0)


def _ellipsoid_footprint(radius_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
    half = [max(int(np.floor(radius_mm / float(d))), 0) for d in spacing_mm]
    grids = np.meshgrid(*[np.arange(-h, h + 1) * float(d) for h, d in zip(half, spacing_mm)],
                        indexing="ij")
    return sum(g * g for g in grids) <= radius_mm**2 + 1e-9


def find_candidates(
    frst: np.ndarray,
    mask: np.ndarray | None = None,
    threshold: float = 0.5,
    min_distance_mm: float = 2.0,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """Local maxima of a normalised FRST map above ``threshold`` inside ``mask``.

    The threshold is relative to the map's normalisation (``frst_25d`` divides by the maximum in
    the volume or brain mask). Measured on a synthetic 120x120x50 scene (1x1x2 mm, 16 spheres of
    2-10 mm and 0.1-0.5 ppm, 8 tubes): 0.5 kept only the 3 strongest spheres, 0.01 found 11/16
    with 16 candidates, 0.001 13/16 with 66 (the misses: spheres of 2.2-4.1 mm). The operating
    point must be calibrated on training data, as the paper did (its Fig. 7); the paper's 0.5
    applies to the cropped cubes (``cube_shapes``).

    A voxel is a maximum when it equals the maximum of the FRST within ``min_distance_mm`` (an
    ellipsoidal footprint in voxels from ``spacing_mm``). Plateaus of equal maxima are merged into
    one candidate at the plateau voxel nearest its centroid.

    Returns:
        int64 array [N, 3] of voxel indices (i, j, k), strongest first.
    """
    f = np.asarray(frst, dtype=np.float32)
    if f.ndim != 3:
        raise DetectionError(f"FRST map must be 3-D, got {f.ndim}-D")
    inside = np.ones(f.shape, bool) if mask is None else np.asarray(mask, bool)
    if inside.shape != f.shape:
        raise DetectionError(f"brain mask shape {inside.shape} differs from FRST shape {f.shape}")
    fp = _ellipsoid_footprint(min_distance_mm, spacing_mm)
    peak = (f == ndimage.maximum_filter(f, footprint=fp, mode="constant", cval=-np.inf))
    peak &= (f >= threshold) & inside
    labels, n = ndimage.label(peak, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return np.zeros((0, 3), dtype=np.int64)
    centres = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        idx = np.argwhere(labels[sl] == lab) + np.array([s.start for s in sl])
        c = idx.mean(axis=0)
        centres.append(idx[np.argmin(((idx - c) ** 2).sum(axis=1))])
    out = np.array(centres, dtype=np.int64)
    order = np.argsort(-f[tuple(out.T)], kind="stable")
    return out[order]


def extract_cubes(
    volume: np.ndarray, centres: np.ndarray, size: int = 7, pad_mode: str = "constant"
) -> np.ndarray:
    """Cubes of ``size``^3 voxels centred on each of ``centres`` [N, 3].

    Cube ``c`` has ``volume[centre]`` at index ``[size // 2] * 3``. Near the border the volume is
    padded with zeros (``pad_mode='constant'``) or the edge value (``'edge'``).

    Returns:
        float32 array [N, size, size, size].
    """
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        raise DetectionError(f"volume must be 3-D, got {v.ndim}-D")
    if size < 1 or size % 2 == 0:
        raise DetectionError(f"cube size must be odd and positive, got {size}")
    c = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    h = size // 2
    padded = np.pad(v, h, mode=pad_mode)
    r = np.arange(size)
    # padded index of cube voxel (a, b, e) for centre (ci, cj, ck) is (ci + a, cj + b, ck + e).
    ii = c[:, 0, None, None, None] + r[None, :, None, None]
    jj = c[:, 1, None, None, None] + r[None, None, :, None]
    kk = c[:, 2, None, None, None] + r[None, None, None, :]
    return padded[ii, jj, kk]


def cube_shapes(cubes: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary shape of each FRST cube: voxels >= ``threshold`` x that cube's maximum.

    Our reading of the paper's "cropped the results obtained from the 2.5D FRST into a 7x7x7 size
    and thresholded them at 0.5": per-cube normalisation makes the input of ``ConvScreen``
    independent of lesion contrast and size (the 2.5D FRST scales with the cube of contrast, so a
    whole-volume normalisation would leave weak CMBs all below 0.5). Cubes whose maximum is <= 0
    give all-zero shapes.

    Returns:
        float32 array of the same shape as ``cubes`` [N, s, s, s], values 0 or 1.
    """
    c = np.asarray(cubes, dtype=np.float32)
    top = c.reshape(len(c), -1).max(axis=1) if len(c) else np.zeros(0, np.float32)
    top = top.reshape((-1,) + (1,) * (c.ndim - 1))
    return ((c >= threshold * top) & (top > 0)).astype(np.float32)


def frangi_vesselness(
    volume: np.ndarray,
    spacing_mm: Sequence[float],
    sigmas_mm: Sequence[float] = (0.5, 1.0, 1.5),
    bright: bool = True,
) -> np.ndarray:
    """Frangi vesselness (Frangi et al. 1998) of a 3-D volume with ``skimage.filters.frangi``.

    ``skimage`` assumes isotropic voxels and scalar sigmas, so an anisotropic volume is resampled
    (linear) to isotropic voxels of the smallest spacing, filtered with sigmas in those voxels, and
    resampled back to the input grid. ``bright=True`` (``black_ridges=False``): veins are bright
    (paramagnetic) on QSM.

    Returns:
        float32 array of the volume's shape, >= 0, high on tubes.
    """
    from skimage.filters import frangi

    v = np.asarray(volume, dtype=np.float32)
    if v.ndim != 3:
        raise DetectionError(f"volume must be 3-D, got {v.ndim}-D")
    sp = np.asarray(spacing_mm, dtype=float)
    iso = float(sp.min())
    zoom = sp / iso
    resample = not np.allclose(zoom, 1.0)
    work = ndimage.zoom(v, zoom, order=1) if resample else v
    out = frangi(work, sigmas=[s / iso for s in sigmas_mm], black_ridges=not bright, mode="reflect")
    if resample:
        out = _zoom_back(out, v.shape)
    return np.asarray(out, dtype=np.float32)


def _filter_matrix(n: int, sigma: float, order: int, truncate: float) -> np.ndarray:
    """The 1-D Gaussian (derivative) filter of ``scipy.ndimage.gaussian_filter1d`` (mode
    ``reflect``) on ``n`` samples as an ``n x n`` matrix: column ``j`` is its response to a unit
    impulse at ``j``, so ``W @ x`` equals the filter applied to ``x``."""
    return ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, order=order, mode="reflect",
                                     truncate=truncate)


def frangi_fields(crops: np.ndarray, sigmas_vox: Sequence[float], bright: bool = True,
                  at: np.ndarray | None = None) -> np.ndarray:
    """Frangi vesselness of each of ``crops`` ``[n, a, b, c]`` (isotropic voxels, sigmas in voxels),
    the same numbers as ``skimage.filters.frangi(crop, sigmas, black_ridges=not bright,
    mode="reflect")`` on every crop (0.26: Hessian by two successive Gaussian first derivatives of
    sigma/sqrt(2), truncate 8 or 100; gamma = half the maximum Hessian norm of the crop at the first
    sigma; alpha = beta = 0.5) to float32 rounding, for all crops at once.

    Written by hand because skimage filters one image at a time and, for sigmas below one voxel,
    with kernels 100 sigma long: on a 13^3 crop each separable pass is a small matrix product
    instead (:func:`_filter_matrix`), and one call handles every candidate.

    ``at`` ``[n, 3]`` (one voxel index per crop): return only the vesselness at those voxels
    (``[n]``), the same numbers as indexing the full fields. The Hessian is still filtered over
    the whole crop (gamma needs the first sigma's largest Hessian norm over it), but the
    eigenvalues and the vesselness of the later sigmas are computed at those voxels only.
    """
    x = np.asarray(crops, dtype=np.float64)
    if x.ndim != 4:
        raise DetectionError(f"crops must be [n, a, b, c], got {x.ndim}-D")
    if bright:  # skimage works on black ridges
        x = -x
    n_crops, shape = x.shape[0], x.shape[1:]
    pick = None
    if at is not None:
        at = np.asarray(at, dtype=np.int64).reshape(n_crops, 3)
        pick = (np.arange(n_crops), at[:, 0], at[:, 1], at[:, 2])
    out = np.zeros(x.shape if pick is None else (n_crops,), dtype=np.float64)
    gamma = None
    for sigma in sigmas_vox:
        truncate = 8 if sigma > 1 else 100
        ss = float(sigma) / np.sqrt(2.0)
        w = [[_filter_matrix(m, ss, o, truncate) for o in (0, 1)] for m in shape]
        hess = {}
        for d0 in range(3):
            for d1 in range(d0, 3):
                mats = []
                for ax in range(3):
                    first = w[ax][1 if ax == d0 else 0]
                    second = w[ax][1 if ax == d1 else 0]
                    mats.append(second @ first)
                h = x
                for ax, m in enumerate(mats):
                    h = np.moveaxis(np.tensordot(h, m, axes=([ax + 1], [1])), -1, ax + 1)
                hess[d0, d1] = h
        mat = np.empty(x.shape + (3, 3), dtype=np.float64)
        for (d0, d1), h in hess.items():
            mat[..., d0, d1] = h
            mat[..., d1, d0] = h
        if pick is None or gamma is None:
            eig = np.linalg.eigvalsh(mat)
            eig = np.take_along_axis(eig, np.argsort(np.abs(eig), axis=-1), axis=-1)
            if gamma is None:
                s = np.sqrt((eig ** 2).sum(-1))
                gamma = s.reshape(n_crops, -1).max(axis=1) / 2.0
                gamma = np.where(gamma == 0, 1.0, gamma).reshape((-1, 1, 1, 1))
            if pick is not None:
                eig = eig[pick]
        else:
            eig = np.linalg.eigvalsh(mat[pick])
            eig = np.take_along_axis(eig, np.argsort(np.abs(eig), axis=-1), axis=-1)
        if pick is not None and gamma.ndim > 1:
            gamma = gamma.reshape(-1)
        lambda1 = eig[..., 0]
        lambda2 = np.maximum(eig[..., 1], 1e-10)
        lambda3 = np.maximum(eig[..., 2], 1e-10)
        r_a = lambda2 / lambda3
        r_b = np.abs(lambda1) / np.sqrt(lambda2 * lambda3)
        s = np.sqrt((eig ** 2).sum(-1))
        with np.errstate(over="ignore", under="ignore"):
            vals = (1.0 - np.exp(-(r_a ** 2) / (2 * 0.5 ** 2))) * np.exp(-(r_b ** 2) / (2 * 0.5 ** 2)) \
                * (1.0 - np.exp(-(s ** 2) / (2 * gamma ** 2)))
        out = np.maximum(out, vals)
    return out.astype(np.float32)


def frangi_at_voxels(
    volume: np.ndarray,
    voxels: np.ndarray,
    bright: np.ndarray,
    spacing_mm: Sequence[float],
    sigmas_mm: Sequence[float] = (0.5, 1.0, 1.5),
    half_mm: float = 6.0,
) -> np.ndarray:
    """Vesselness at each voxel of ``voxels`` [n, 3]: :func:`frangi_vesselness` of the crop of
    ``volume`` within ``half_mm`` (at least 3 voxels) of the voxel, read at the voxel, as stage I
    measures it, for every candidate at once (:func:`frangi_fields`). ``bright[m]`` is the polarity
    of candidate ``m``. Crops with fewer than 3 voxels along an axis give 0."""
    v = np.asarray(volume, dtype=np.float32)
    vox = np.asarray(voxels, dtype=np.int64).reshape(-1, 3)
    bright = np.asarray(bright, dtype=bool).reshape(-1)
    sp = np.asarray(spacing_mm, dtype=float)
    half = np.maximum(np.ceil(half_mm / sp).astype(int), 3)
    iso = float(sp.min())
    zoom = sp / iso
    resample = not np.allclose(zoom, 1.0)
    sig = [s / iso for s in sigmas_mm]
    out = np.zeros(len(vox), np.float32)
    groups: dict[tuple, list[int]] = {}
    boxes = []
    for m, c in enumerate(vox):
        sl = tuple(slice(max(int(ci) - h, 0), min(int(ci) + h + 1, n)) for ci, h, n in zip(c, half, v.shape))
        boxes.append(sl)
        shape = tuple(s.stop - s.start for s in sl)
        if min(shape) >= 3:
            groups.setdefault((shape, bool(bright[m])), []).append(m)
    for (shape, is_bright), members in groups.items():
        crops = np.stack([v[boxes[m]] for m in members])
        if resample:
            crops = np.stack([ndimage.zoom(c, zoom, order=1) for c in crops])
        local = np.array([[int(ci) - s.start for ci, s in zip(vox[m], boxes[m])] for m in members])
        if not resample:  # read at the candidate only (same numbers, a third of the eigenvalues)
            out[members] = frangi_fields(crops, sig, bright=is_bright, at=local)
            continue
        fields = frangi_fields(crops, sig, bright=is_bright)
        for f, m, loc in zip(fields, members, local):
            out[m] = float(_zoom_back(f, shape)[tuple(loc)])
    return out


def _zoom_back(field: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A field filtered on the isotropic grid brought back (linear) to the crop's ``shape``."""
    back = np.array(shape) / np.array(field.shape)
    out = ndimage.zoom(field, back, order=1)
    out = out[: shape[0], : shape[1], : shape[2]]
    if out.shape != tuple(shape):
        out = np.pad(out, [(0, a - b) for a, b in zip(shape, out.shape)], mode="edge")
    return out


class ConvScreen(nn.Module):
    """The paper's stage-I screen: one convolution layer classifying 7x7x7 FRST cubes (CMB vs vessel).

    The paper says only "a convolutional layer"; our reading: one ``Conv3d(1, channels, kernel)``
    with zero padding, ReLU, global max-pool over the cube and a linear layer to one logit
    (positive = CMB). With the defaults (8 filters of 3x3x3) it has 8*27 + 8 + 8 + 1 = 233 parameters.

    Input [N, 1, 7, 7, 7]; output logits [N].
    """

    def __init__(self, channels: int = 8, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, channels, kernel_size, padding=kernel_size // 2)
        self.fc = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = torch.amax(h, dim=(2, 3, 4))
        return self.fc(h).squeeze(-1)
