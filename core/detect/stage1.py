"""Stage I of the reference method (Xia et al. 2023, JMRI): QSM -> microbleed candidates.

The paper's stage I: 3-D erosion of the brain mask by 5 voxels, 2.5D FRST of the QSM (product of
the 2D FRST of the axial, coronal and sagittal planes, :mod:`core.detect.frst`), 7x7x7 FRST cubes
per candidate for the one-layer convolutional screen, Frangi vesselness. What the paper does not
give, and how we chose it:

* **A threshold that means the same thing in every subject.** The paper normalises the 2.5D FRST
  by its maximum and thresholds at 0.5. That maximum is set by the strongest focus in the volume
  (a large bleed, a vein, an edge), and the product of three plane maps grows with the cube of the
  lesion contrast, so a fixed fraction of it keeps only the strongest lesions (measured: 3 of 16
  spheres). We instead

  1. divide the QSM by a robust noise/texture scale of the subject, ``sigma`` = 1.4826 x the
     median absolute deviation of chi inside the eroded brain mask (QSM is already in ppm, but
     noise and streaking differ with SNR, echoes and voxel size; dividing by ``sigma`` makes the
     input a z-score, so the threshold is "how many noise units stand out radially symmetric");
  2. take the **geometric mean** of the three plane FRST maps (cube root of the paper's product,
     each plane map *not* divided by its maximum): it keeps the paper's property that a focus must
     be radially symmetric in all three planes (a vessel is a disk in at most one plane), but
     scales linearly with contrast, so one threshold covers faint and bright lesions;
  3. threshold that map at ``Stage1Params.threshold`` (calibrated on simulated subjects whose QSM
     our own chain reconstructed from magnitude/phase: see ``Stage1Params``).

* **Diamagnetic foci** (calcifications, the paper's "calcification mimics discarded at stage I")
  are found with the same transform on ``-chi`` and returned with ``diamagnetic = True``; later
  stages report them as mimics and must never call them microbleeds.

* **Per-candidate measurements**: voxel and LPS centre, FRST score, peak chi (3x3x3 maximum of
  chi or -chi), mean chi inside the estimated lesion (voxels connected to the centre above half
  way from the local background to the peak), local background (median chi in a 7 mm shell),
  equivalent diameter of that region, Frangi vesselness (Frangi et al. 1998) at the centre
  computed on a 13 mm crop, and the 7x7x7 cube of the FRST map for ``ConvScreen``.

Everything is computed on the bounding box of the eroded mask (plus the largest radius), which
saves most of the volume outside the brain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from core.detect import DetectionError
from core.detect.candidates import (
    erode_brain_mask,
    extract_cubes,
    find_candidates,
    frangi_at_voxels,
)
from core.detect.frst import _frst_on_axes_signed
from core.geometry import Geometry

FEATURE_NAMES: tuple[str, ...] = (
    "frst_score",
    "peak_chi_ppm",
    "mean_chi_ppm",
    "background_chi_ppm",
    "diameter_mm",
    "vesselness",
    "diamagnetic",
)


@dataclass(frozen=True)
class Stage1Params:
    """Stage I settings.

    ``threshold`` is on the geometric-mean 2.5D FRST of chi / sigma (see module docstring), so it
    is in noise units and not comparable to the paper's 0.5 of a max-normalised map. Calibration
    (simulated, 1 mm, 4 echoes, QSM by our STAR-QSM chain from simulated magnitude/phase):

    * first set, seeds 1000-1003, 10 microbleeds each: the 40 bleeds scored 0.13-2.3; 0.132 found
      40/40 with 22.8 paramagnetic false positives per subject. That threshold did not generalise:
    * held out, ``python -m training.dataset --subjects 5 --seed 7`` at 0.12: 23/27 (0.85),
      33.4 FP and 38 candidates per subject; ``--subjects 4 --seed 8 --n-cmb 10 --threshold
      0.06``: 0.06 -> 39/40 (0.975), 139 FP / 149 candidates per subject; 0.08 -> 37/40, 80 FP;
      0.10 -> 36/40, 51 FP; 0.12 -> 35/40, 34 FP; 0.15 -> 34/40, 17 FP; 0.20 -> 32/40, 4 FP.

    The misses are faint small bleeds (chi 0.21-0.43 ppm, 2.4-4.2 mm; one 2.4 mm / 0.71 ppm): near
    the noise floor of the reconstructed QSM (sigma 0.04-0.05 ppm), the 2.5D FRST scores them like
    noise maxima. The default 0.06 is the highest threshold that met sensitivity >= 0.97 on held-out
    subjects; confirmed on fresh ones (``--subjects 4 --seed 9 --n-cmb 10``: 40/40, 140.8 FP and
    150.8 candidates per subject, all 5 calcifications found as diamagnetic candidates); it leaves ~150 candidates per subject for the ConvScreen and stage II (the paper
    reports ~30 false positives per subject after its convolutional screen). ``beta`` 0.02 instead
    of 0.1 raised the false positives (42 vs 23 per subject at full sensitivity, one subject) and
    tripled the run time, so the paper's 0.1 stays. The same threshold serves the diamagnetic map.
    Other voxel sizes need their own calibration (the FRST votes are per mm).
    """

    erosion_voxels: int = 5
    radii_mm: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)
    alpha: float = 2.0
    beta: float = 0.1
    threshold: float = 0.06
    min_distance_mm: float = 3.0
    diamagnetic: bool = True
    diamagnetic_threshold: float | None = None  # None: same as ``threshold``
    cube_size: int = 7
    frangi_sigmas_mm: tuple[float, ...] = (0.5, 1.0, 1.5)
    max_candidates: int = 2000


@dataclass
class Candidates:
    """Stage I output: N candidates, strongest first within each polarity (paramagnetic first).

    Arrays are indexed by candidate. ``cubes`` are 7x7x7 cubes of ``frst_map`` (float32).
    ``frst_map`` is the paramagnetic map; ``frst_map_dia`` the diamagnetic one (or None).
    """

    voxel: np.ndarray  # int64 [N, 3]
    lps_mm: np.ndarray  # float64 [N, 3]
    score: np.ndarray  # float32 [N]
    peak_chi_ppm: np.ndarray  # float32 [N] (signed chi at the peak)
    mean_chi_ppm: np.ndarray  # float32 [N]
    background_chi_ppm: np.ndarray  # float32 [N]
    diameter_mm: np.ndarray  # float32 [N]
    vesselness: np.ndarray  # float32 [N]
    diamagnetic: np.ndarray  # bool [N]
    cubes: np.ndarray  # float32 [N, 7, 7, 7]
    eroded_mask: np.ndarray
    sigma_ppm: float
    frst_map: np.ndarray | None = None
    frst_map_dia: np.ndarray | None = None
    params: Stage1Params = field(default_factory=Stage1Params)
    timings_s: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(len(self.voxel))

    def features(self) -> np.ndarray:
        """[N, len(FEATURE_NAMES)] float32 matrix in the order of :data:`FEATURE_NAMES`."""
        return np.stack(
            [self.score, self.peak_chi_ppm, self.mean_chi_ppm, self.background_chi_ppm,
             self.diameter_mm, self.vesselness, self.diamagnetic.astype(np.float32)], axis=1,
        ).astype(np.float32).reshape(len(self), len(FEATURE_NAMES))


def robust_sigma(chi_ppm: np.ndarray, mask: np.ndarray) -> float:
    """1.4826 x median absolute deviation of chi inside ``mask`` (ppm); the z-score scale."""
    v = np.asarray(chi_ppm, dtype=np.float32)[mask]
    if v.size == 0:
        raise DetectionError("the brain mask is empty after erosion; no candidates can be searched")
    s = 1.4826 * float(np.median(np.abs(v - np.median(v))))
    if not np.isfinite(s) or s <= 0:
        s = float(np.std(v))
    if not np.isfinite(s) or s <= 0:
        raise DetectionError("the QSM is constant inside the brain; no candidates can be searched")
    return s


def frst_25d_geomean(
    volume: np.ndarray,
    spacing_mm,
    radii_mm=(1.0, 2.0, 3.0, 4.0, 5.0),
    alpha: float = 2.0,
    beta: float = 0.1,
    mode: str = "bright",
) -> np.ndarray:
    """Geometric mean of the axial, coronal and sagittal 2D FRST maps (each clipped at 0), in the
    units of ``volume``'s gradient: the cube root of the paper's 2.5D product, without the
    per-plane division by the maximum (so it is linear in contrast)."""
    return frst_25d_geomean_signed(volume, spacing_mm, radii_mm, alpha, beta, mode, (1,))[0]


def frst_25d_geomean_signed(volume: np.ndarray, spacing_mm, radii_mm, alpha: float, beta: float,
                            mode: str, volume_signs) -> list[np.ndarray]:
    """:func:`frst_25d_geomean` of ``sign * volume`` for each sign (+1: paramagnetic, -1:
    diamagnetic), sharing the gradients and vote offsets (identical to separate calls)."""
    prods: list[np.ndarray | None] = [None] * len(volume_signs)
    for axes in ((0, 1), (0, 2), (1, 2)):
        maps = _frst_on_axes_signed(volume, spacing_mm, radii_mm, axes, alpha, beta, mode,  # type: ignore[arg-type]
                                    volume_signs)
        for i, s in enumerate(maps):
            s = np.maximum(s, 0.0)
            prods[i] = s if prods[i] is None else prods[i] * s
    return [np.cbrt(p).astype(np.float32) for p in prods]  # type: ignore[arg-type]


def _bbox(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _box(centre, half, shape) -> tuple[slice, ...]:
    return tuple(slice(max(int(c) - h, 0), min(int(c) + h + 1, n)) for c, h, n in zip(centre, half, shape))


def half_max_region(chi_s: np.ndarray, c, spacing: np.ndarray, radius_mm: float = 6.0,
                    structure: np.ndarray | None = None
                    ) -> tuple[tuple[slice, ...], np.ndarray, float, float]:
    """The focus at voxel ``c`` of ``chi_s`` (chi with its polarity made positive): background =
    median over the 5-7 mm shell, peak = maximum within one voxel of ``c``, region = the voxels at
    or above half way from background to peak within ``radius_mm`` of ``c`` that are connected
    (``structure``, as :func:`scipy.ndimage.label`; default 6-neighbour) to the peak voxel, which
    always belongs to it. Returns (box, bool region of the box, peak, background)."""
    spacing = np.asarray(spacing, dtype=float)
    half = np.maximum(np.ceil(max(7.0, radius_mm + 1.0) / spacing).astype(int), 2)
    sl = _box(c, half, chi_s.shape)
    sub = chi_s[sl]
    lc = [int(ci) - s.start for ci, s in zip(c, sl)]
    grids = np.meshgrid(*[(np.arange(s.stop - s.start) - l0) * d for s, l0, d in zip(sl, lc, spacing)],
                        indexing="ij")
    r = np.sqrt(sum(g * g for g in grids))
    shell = (r > 5.0) & (r <= 7.0)
    bg = float(np.median(sub[shell])) if shell.any() else 0.0
    near = r <= 1.01 * float(spacing.max())
    pk = np.unravel_index(int(np.argmax(np.where(near, sub, -np.inf))), sub.shape)
    peak = float(sub[pk])
    level = bg + 0.5 * (peak - bg)
    lab, _ = ndimage.label((sub >= level) & (r <= radius_mm), structure=structure)
    region = lab == lab[pk] if lab[pk] > 0 else np.zeros(sub.shape, bool)
    region[pk] = True
    return sl, region, peak, bg


def _measure(chi_s: np.ndarray, c: np.ndarray, spacing: np.ndarray) -> tuple[float, float, float, float]:
    """Peak, mean inside the half-maximum region, background and equivalent diameter of the focus
    at voxel ``c`` of ``chi_s`` (chi with the candidate's polarity made positive)."""
    sl, region, peak, bg = half_max_region(chi_s, c, spacing)
    vol = float(region.sum()) * float(np.prod(spacing))
    diam = float((6.0 * vol / np.pi) ** (1.0 / 3.0))
    return peak, float(chi_s[sl][region].mean()), bg, diam


def detect_candidates(
    chi_ppm: np.ndarray,
    brain_mask: np.ndarray,
    geometry: Geometry,
    *,
    params: Stage1Params = Stage1Params(),
    keep_maps: bool = False,
) -> Candidates:
    """Stage I: microbleed (paramagnetic) and calcification-mimic (diamagnetic) candidates.

    Args:
        chi_ppm: QSM [i, j, k] in ppm (from :func:`core.qsm.pipeline.reconstruct`).
        brain_mask: brain mask on the same grid (the QSM chain's mask).
        geometry: the grid (spacing, LPS affine).
        params: :class:`Stage1Params`.
        keep_maps: keep the full-size FRST maps in the result (memory: 4 bytes/voxel each).

    Returns:
        :class:`Candidates`, paramagnetic candidates (strongest first) then diamagnetic ones.

    Raises:
        DetectionError: wrong shapes, empty mask, constant QSM.
    """
    t0 = time.perf_counter()
    chi = np.asarray(chi_ppm, dtype=np.float32)
    mask = np.asarray(brain_mask, dtype=bool)
    if chi.ndim != 3 or mask.shape != chi.shape:
        raise DetectionError(f"QSM {chi.shape} and brain mask {mask.shape} must be 3-D and of one size")
    if tuple(geometry.shape) != chi.shape:
        raise DetectionError(f"QSM {chi.shape} does not match its geometry {tuple(geometry.shape)}")
    if not np.all(np.isfinite(chi[mask])):
        raise DetectionError("the QSM has NaN or infinite values inside the brain")
    spacing = np.asarray(geometry.spacing, dtype=float)
    tm: dict[str, float] = {}
    emask = erode_brain_mask(mask, params.erosion_voxels)
    if not emask.any():
        raise DetectionError("the brain mask is empty after the 5-voxel erosion; no candidates searched")
    sigma = robust_sigma(chi, emask)
    margin = int(np.ceil(max(params.radii_mm) / spacing.min())) + params.cube_size
    box = _bbox(emask, margin)
    z = np.where(mask[box], chi[box] / np.float32(sigma), np.float32(0.0))
    em = emask[box]
    tm["prepare_s"] = time.perf_counter() - t0

    polarities = [False] + ([True] if params.diamagnetic else [])
    out_vox, out_score, out_dia, out_cubes = [], [], [], []
    maps: dict[bool, np.ndarray] = {}
    t = time.perf_counter()
    frst_maps = frst_25d_geomean_signed(z, spacing, params.radii_mm, params.alpha, params.beta, "bright",
                                        [-1 if dia else 1 for dia in polarities])
    tm["frst_s"] = time.perf_counter() - t
    for dia, f in zip(polarities, frst_maps):
        t = time.perf_counter()
        f = np.where(em, f, np.float32(0.0))
        thr = params.threshold if not dia or params.diamagnetic_threshold is None else params.diamagnetic_threshold
        vox = find_candidates(f, em, threshold=thr, min_distance_mm=params.min_distance_mm,
                              spacing_mm=spacing)[: params.max_candidates]
        out_vox.append(vox + np.array([s.start for s in box]))
        out_score.append(f[tuple(vox.T)] if len(vox) else np.zeros(0, np.float32))
        out_dia.append(np.full(len(vox), dia))
        out_cubes.append(extract_cubes(f, vox, params.cube_size))
        maps[dia] = f
        tm["candidates_dia_s" if dia else "candidates_para_s"] = time.perf_counter() - t

    t = time.perf_counter()
    voxel = np.concatenate(out_vox).astype(np.int64).reshape(-1, 3)
    dia_arr = np.concatenate(out_dia).astype(bool)
    n = len(voxel)
    peak = np.zeros(n, np.float32)
    mean = np.zeros(n, np.float32)
    bg = np.zeros(n, np.float32)
    diam = np.zeros(n, np.float32)
    neg = -chi
    for m in range(n):
        c = voxel[m]
        src = neg if dia_arr[m] else chi
        p, mu, b, d = _measure(src, c, spacing)
        sign = -1.0 if dia_arr[m] else 1.0
        peak[m], mean[m], bg[m], diam[m] = sign * p, sign * mu, sign * b, d
    # vesselness of each candidate's 6 mm crop, read at the candidate (all crops in one call)
    vess = frangi_at_voxels(chi, voxel, ~dia_arr, spacing, params.frangi_sigmas_mm, half_mm=6.0)
    tm["measure_s"] = time.perf_counter() - t

    full_maps: dict[bool, np.ndarray] = {}
    if keep_maps:
        for dia, f in maps.items():
            full = np.zeros(chi.shape, np.float32)
            full[box] = f
            full_maps[dia] = full
    tm["total_s"] = time.perf_counter() - t0
    return Candidates(
        voxel=voxel,
        lps_mm=geometry.voxel_to_patient(voxel.astype(np.float64)).reshape(-1, 3),
        score=np.concatenate(out_score).astype(np.float32),
        peak_chi_ppm=peak,
        mean_chi_ppm=mean,
        background_chi_ppm=bg,
        diameter_mm=diam,
        vesselness=vess,
        diamagnetic=dia_arr,
        cubes=np.concatenate(out_cubes).astype(np.float32).reshape(-1, *(params.cube_size,) * 3),
        eroded_mask=emask,
        sigma_ppm=sigma,
        frst_map=full_maps.get(False),
        frst_map_dia=full_maps.get(True),
        params=params,
        timings_s=tm,
    )
