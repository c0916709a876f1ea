"""The QSM chain of Xia et al. 2023 (seed paper): brain mask -> Laplacian unwrapping -> echo fit ->
V-SHARP -> STAR-QSM (or TKD), as one function on numpy arrays.

    magnitude, phase [e, i, j, k]  --mask.brain_mask-->  mask
    phase --echo_fit.remove_phase_offset (>= 2 echoes)--> echo-1-referenced phase differences
          --unwrap.path_unwrap (first difference) + echo_fit.temporal_unwrap (later ones)-->
          unwrapped phase, frequency (weighted LS fit), fit residual --> total field (ppm)
    total field --vsharp.vsharp (or pdf.pdf, lbv.lbv: bg_method) on reliable_mask--> local field (ppm),
          eroded mask
    (unwrap_method="wrapped_diff"/"sincos": the former Laplacian unwrapping of every echo)
    local field --star.star_qsm | tkd.tkd--> chi (ppm)

Reference: ``chi`` is returned with its mean over the eroded mask set to 0 (the dipole inversion
cannot see a constant; whole-brain mean is the most stable reference in the presence of lesions,
CSF referencing needs a segmentation this step does not have). Outside the eroded mask chi is 0.

B0 direction: ``geometry.b0_direction_ijk()``, so oblique slices use the true field direction.
Units: phase in radians, echo times in seconds, field strength in tesla, fields and chi in ppm.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from core.errors import ReconstructionError
from core.geometry import Geometry
from core.qsm._fft import mask_bbox, pad_voxels_for
from core.physics import phase_to_field_ppm
from core.qsm.echo_fit import (echo1_consistency, fit_field_ppm, fit_residual_rad, remove_phase_offset,
                               temporal_unwrap)
from core.qsm.lbv import lbv
from core.qsm.mask import _distance_inside, brain_mask, erode_mask
from core.qsm.pdf import pdf
from core.qsm.star import star_qsm
from core.qsm.tkd import tkd
from core.qsm.unwrap import laplacian_unwrap, path_unwrap
from core.qsm.vsharp import vsharp

log = logging.getLogger(__name__)

MIN_VOXELS_PER_AXIS = 16
# Background field removal: core.qsm.vsharp / pdf / lbv (reconstruct(bg_method=...), app --bg-method).
# Validation (bench/results/bgremove.json; qsm-forward simple phantom 3 T + 7 T, simulator seeds
# 4101-4103 1.5 mm; whole chain with STAR, only this step changed; QSM-CI metrics), mean local-field
# / chi nRMSE %, chi HFEN %: qsm-forward V-SHARP 41.6 / 32.0 / 29.9, PDF 30.5 / 23.9 / 16.9, LBV
# 20.6 / 16.4 / 12.6; simulator V-SHARP 56.5 / 59.1 / 43.7, PDF 54.4 / 58.3 / 41.6, LBV 56.1 / 55.9 /
# 40.0. LBV has the best chi on every case, at V-SHARP's cost in time. V-SHARP stays the default
# for now only because the detection models (models/*.pt) were trained on V-SHARP QSM
# (training/dataset.py calls reconstruct with the defaults): switching changes what they see, so the
# switch belongs with a retrain and an end-to-end detection check (bench/end_to_end.py).
BG_METHODS = ("vsharp", "pdf", "lbv")
CROP_MARGIN_MM = 6.0  # margin kept around the brain mask's bounding box after masking
# V-SHARP gets the brain mask without the dark voxels of its outermost layer: where a magnitude
# mask's boundary voxels are partial-volumed with bone / dura (last-echo magnitude, where bone's
# short T2* makes them darkest, below EDGE_DARK_FRACTION of the brain's median) they hold strong
# (-2 ppm) sources whose field V-SHARP's small edge spheres keep as "local". The mask itself comes
# from echo 1 and is bright there. Measured (bench/qsm.py subject b01, simulated 1.5 mm, Siemens
# 4 echoes): chi nRMSE TKD 167 % -> 119 %, STAR 280 % -> 170 %, local field 159 % -> 112 %.
# Bright (CSF) edge voxels are kept, so tight masks (core.qsm.phantom) are unaffected.
EDGE_DARK_FRACTION = 0.75
# Reliable-phase mask for background removal (unwrap_method="temporal"): the brain mask without
# signal dropout (last-echo magnitude below DROPOUT_FRACTION x its median in the mask: sinuses,
# skull base, bone partial volume, where the field is wrong and holds strong non-brain sources),
# without voxels whose echo fit misfits by more than RESIDUAL_MAX_RAD, then eroded by
# RELIABLE_ERODE_MM; small enclosed holes (dark lesions, veins) are filled back. Filling every
# enclosed hole brought back enclosed dropout near the sinuses (seed 3101, 2 mm, TKD 95 % -> 140 %). The returned
# brain mask is not changed. Measured on simulate_subject("d", 3101,
# 2 mm, 4 echoes), TKD chi nRMSE: whole mask 182 %, dropout removed 110 %, + 2 mm erosion 95 %.
DROPOUT_FRACTION = 0.5
RESIDUAL_MAX_RAD = 0.5
RELIABLE_ERODE_MM = 2.0
INPAINT_LESION_HOLES = True
LESION_HOLE_MAX_MM = 12.0  # enclosed holes up to this sphere diameter are filled back (microbleeds)
# STAR-QSM's data term is weighted by how far V-SHARP's estimate can be trusted (see data_weights):
# near the mask edge V-SHARP must use spheres much smaller than the one it deconvolves with, so its
# local field is least accurate there (on seed 3101, 1.5 mm, 41 % of the local-field error lies in
# the outer 3 mm, 13 % of the voxels). Measured (simulate_subject 1.5 mm, chi nRMSE %, STAR / TKD):
# seed 3101 4 echoes 65.1 -> 61.6 (TKD 81.5), 3104 1 echo 63.7 -> 60.9 (70.8), 3106 oblique 62.6 ->
# 62.5 (70.0) with RIM_WEIGHT_MM = 6; 3 mm and 10 mm ramps and a squared ramp did no better. A
# magnitude-based noise weight (sqrt(sum_e m_e^2 TE_e^2), as in MEDI) made seed 3101 worse (67.7).
# Inpainted lesion holes keep their weight: with weight 0 there, the toy phantom's (core.qsm.phantom)
# lesion cores came out at 0.61 / 0.41 / -0.34 ppm instead of 0.75 / 0.45 / -0.42 (truth 0.77 /
# 0.47 / -0.50): the harmonic fill anchors the source's amplitude better than its surroundings alone.
DATA_WEIGHTING = True
RIM_WEIGHT_MM = 6.0
RIM_WEIGHT_MIN = 0.1


@dataclass
class QSMResult:
    """Everything the chain produces, on the input grid (float32 / bool arrays)."""

    chi_ppm: np.ndarray
    mask: np.ndarray
    eroded_mask: np.ndarray
    local_field_ppm: np.ndarray
    total_field_ppm: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)
    method: str = "star"
    reference: str = "mean over eroded mask = 0"
    unwrap_corrected_voxels: int = 0  # core.qsm.echo_fit.echo1_consistency: > 0 flags a one-cycle error
    background: str = "vsharp"  # background field removal that made local_field_ppm (BG_METHODS); "" if none
    series_paths: list = field(default_factory=list)  # the DICOM QSM series once written (operators.qsm_writer), by slice


def _validate(
    magnitude: np.ndarray, phase: np.ndarray, te: np.ndarray, b0_t: float, geometry: Geometry
) -> None:
    if magnitude.shape != phase.shape:
        raise ReconstructionError(
            f"magnitude {magnitude.shape} and phase {phase.shape} differ in shape; a slice or echo is missing"
        )
    if phase.ndim != 4:
        raise ReconstructionError(f"expected echo stacks [echo, i, j, k], got {phase.ndim}-D arrays")
    if te.size != phase.shape[0]:
        raise ReconstructionError(f"{phase.shape[0]} echoes in the images but {te.size} echo times")
    if not np.all(np.isfinite(te)) or np.any(te <= 0) or np.any(np.diff(te) <= 0):
        raise ReconstructionError(f"echo times must be positive and increasing, got {te.tolist()} s")
    if not np.isfinite(b0_t) or b0_t <= 0:
        raise ReconstructionError(f"field strength must be positive, got {b0_t} T")
    if tuple(geometry.shape) != tuple(phase.shape[1:]):
        raise ReconstructionError(
            f"geometry {geometry.shape} does not match the image size {phase.shape[1:]}"
        )
    if min(phase.shape[1:]) < MIN_VOXELS_PER_AXIS:
        raise ReconstructionError(
            f"volume {phase.shape[1:]} too small for QSM: need at least {MIN_VOXELS_PER_AXIS} voxels per axis"
        )
    if not (np.all(np.isfinite(phase)) and np.all(np.isfinite(magnitude))):
        raise ReconstructionError("phase or magnitude images contain NaN or infinite values")
    if float(np.ptp(phase)) < 1e-6:
        raise ReconstructionError("phase images are constant (no phase information); check the phase series")


def data_weights(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """STAR-QSM data weight ``W``: ``clip(d / RIM_WEIGHT_MM, RIM_WEIGHT_MIN, 1)`` with ``d`` the
    distance (mm) to the outside of ``mask``; zero outside ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    w = np.clip(_distance_inside(mask, spacing) / RIM_WEIGHT_MM, RIM_WEIGHT_MIN, 1.0)
    return np.where(mask, w, 0.0).astype(np.float32)


def trim_dark_edge(mask: np.ndarray, magnitude: np.ndarray, spacing: Sequence[float],
                   fraction: float = EDGE_DARK_FRACTION) -> np.ndarray:
    """``mask`` without the voxels of its outermost layer (within one voxel of the outside) whose
    magnitude is below ``fraction`` x the median magnitude inside ``mask`` (partial volume with bone)."""
    interior = erode_mask(mask, float(max(spacing)), spacing, border_inside=True)
    if not interior.any():
        return mask
    dark = magnitude < fraction * float(np.median(magnitude[mask]))
    return mask & ~(dark & ~interior)


def inpaint_harmonic(values: np.ndarray, holes: np.ndarray, iterations: int = 200) -> np.ndarray:
    """``values`` with the voxels of ``holes`` replaced by a harmonic (Laplace) interpolation from
    their surroundings: Jacobi iterations of the 6-neighbour mean, holes started at their rim's mean."""
    out = np.asarray(values, dtype=np.float32).copy()
    holes = np.asarray(holes, dtype=bool)
    if not holes.any():
        return out
    idx = np.argwhere(holes)
    lo = np.maximum(idx.min(0) - 1, 0)
    hi = np.minimum(idx.max(0) + 2, holes.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    v, h = out[box], holes[box]
    rim = ndi.binary_dilation(h) & ~h
    v[h] = float(v[rim].mean()) if rim.any() else 0.0
    # Jacobi on the hole voxels only: their six neighbours (the edge repeated at the array's faces,
    # as np.pad(mode="edge") did) gathered by flat index, summed in the same order as before.
    shape = np.array(holes.shape)
    flat = np.ravel_multi_index(idx.T, holes.shape)
    nbrs = []
    for ax in range(3):
        for d in (1, -1):
            c = idx.copy()
            c[:, ax] = np.clip(c[:, ax] + d, 0, shape[ax] - 1)
            nbrs.append(np.ravel_multi_index(c.T, holes.shape))
    work = out.reshape(-1)
    for _ in range(iterations):
        g = [work[n] for n in nbrs]
        work[flat] = (g[0] + g[1] + g[2] + g[3] + g[4] + g[5]) / 6.0
    return out


def lesion_holes(mask: np.ndarray, last_magnitude: np.ndarray, spacing: Sequence[float],
                 residual_rad: np.ndarray | None = None) -> np.ndarray:
    """Small regions enclosed by brain whose phase is unreliable (dark on the last echo or misfit):
    microbleeds, veins. They stay in the mask; their field is inpainted (see reconstruct)."""
    bad = last_magnitude < DROPOUT_FRACTION * float(np.median(last_magnitude[mask]))
    if residual_rad is not None:
        bad |= residual_rad > RESIDUAL_MAX_RAD
    keep = mask & ~bad
    holes = ndi.binary_fill_holes(keep) & mask & ~keep
    if not holes.any():
        return holes
    lab, n = ndi.label(holes)
    sizes = np.bincount(lab.ravel(), minlength=n + 1) * float(np.prod(spacing))
    small = sizes <= np.pi / 6.0 * LESION_HOLE_MAX_MM**3
    small[0] = False
    return small[lab]


def reliable_mask(mask: np.ndarray, last_magnitude: np.ndarray, spacing: Sequence[float],
                  residual_rad: np.ndarray | None = None) -> np.ndarray:
    """The part of ``mask`` whose phase background removal should trust (see DROPOUT_FRACTION)."""
    keep = mask & (last_magnitude >= DROPOUT_FRACTION * float(np.median(last_magnitude[mask])))
    if residual_rad is not None:
        keep &= residual_rad <= RESIDUAL_MAX_RAD
    keep |= lesion_holes(mask, last_magnitude, spacing, residual_rad)
    if RELIABLE_ERODE_MM > 0:
        keep = erode_mask(keep, RELIABLE_ERODE_MM, spacing, border_inside=True)
    return keep if keep.sum() >= 27 else mask


def reconstruct(
    magnitude: np.ndarray,
    phase_rad: np.ndarray,
    echo_times_s: Sequence[float],
    field_strength_t: float,
    geometry: Geometry,
    *,
    method: str = "star",
    mask: np.ndarray | None = None,
    device=None,
    unwrap_method: str = "temporal",
    remove_offset: bool = True,
    bg_method: str = "vsharp",
) -> QSMResult:
    """Run the whole chain. ``magnitude``/``phase_rad`` are ``[e, i, j, k]`` (3-D means one echo).

    ``remove_offset``: reference later echoes to echo 1 (needs >= 2 echoes; see core.qsm.echo_fit).
    ``unwrap_method``: ``"temporal"`` (default): path-following spatial unwrapping of the first
    (shortest) echo difference inside the mask, temporal unwrapping of the later ones
    (core.qsm.echo_fit.temporal_unwrap), background removal on ``reliable_mask``; ``"wrapped_diff"``
    or ``"sincos"``: Laplacian unwrapping of every echo (the former chain).
    ``bg_method``: background field removal, ``"vsharp"`` (default), ``"pdf"`` or ``"lbv"``; all three
    return the same eroded mask (the reliable mask less one voxel layer); the timing is keyed by it.

    Raises:
        ReconstructionError: unusable input (shapes, echo count, NaN or constant phase, too small).
    """
    if unwrap_method not in ("temporal", "wrapped_diff", "sincos"):
        raise ValueError(f"unwrap_method must be temporal, wrapped_diff or sincos, got {unwrap_method!r}")
    if method not in ("star", "tkd"):
        raise ValueError(f"method must be 'star' or 'tkd', got {method!r}")
    if bg_method not in BG_METHODS:
        raise ValueError(f"bg_method must be one of {', '.join(BG_METHODS)}, got {bg_method!r}")
    mag = np.asarray(magnitude, dtype=np.float32)
    ph = np.asarray(phase_rad, dtype=np.float32)
    if mag.ndim == 3 and ph.ndim == 3:
        mag, ph = mag[None], ph[None]
    te = np.atleast_1d(np.asarray(echo_times_s, dtype=np.float64))
    _validate(mag, ph, te, float(field_strength_t), geometry)
    spacing = geometry.spacing
    b0 = geometry.b0_direction_ijk()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if mask is None:
        mask = brain_mask(mag, spacing)
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != ph.shape[1:]:
            raise ReconstructionError(f"brain mask {mask.shape} does not match the image size {ph.shape[1:]}")
    if not mask.any():
        raise ReconstructionError("brain mask is empty; no brain found in the magnitude image")
    timings["mask"] = time.perf_counter() - t

    # Everything after the mask works on the mask's bounding box plus a margin (less noise-only
    # phase to unwrap, smaller FFTs); results are pasted back into full-size arrays.
    box = mask_bbox(mask, pad_voxels_for(spacing, CROP_MARGIN_MM))
    full_shape = mask.shape
    mag, ph, mask_box = mag[(slice(None),) + box], ph[(slice(None),) + box], mask[box]

    t = time.perf_counter()
    if remove_offset and ph.shape[0] >= 2:
        psi, weights, dte = remove_phase_offset(ph, mag, te)
    else:
        psi, weights, dte = ph, mag, te
    residual = None
    unwrap_corrected = 0
    if unwrap_method == "temporal":
        first = path_unwrap(psi[0], mask_box)
        if remove_offset and ph.shape[0] >= 2:
            first, n_fixed = echo1_consistency(first, ph[0], mag[0], float(te[0]), float(dte[0]), mask_box,
                                               spacing)
            unwrap_corrected = n_fixed
        unwrapped, omega = temporal_unwrap(psi, first, weights, dte, mask_box)
        timings["unwrap"] = time.perf_counter() - t
        t = time.perf_counter()
        residual = fit_residual_rad(unwrapped, weights, dte, omega)
        total = np.asarray(phase_to_field_ppm(omega, 1.0, float(field_strength_t)), dtype=np.float32)
    else:
        unwrapped = laplacian_unwrap(psi, spacing, method=unwrap_method, device=device)
        timings["unwrap"] = time.perf_counter() - t
        t = time.perf_counter()
        total = fit_field_ppm(unwrapped, weights, dte, float(field_strength_t), mask_box)
    total = np.where(mask_box, total, 0.0).astype(np.float32)
    timings["echo_fit"] = time.perf_counter() - t

    t = time.perf_counter()
    if unwrap_method == "temporal":
        vmask = reliable_mask(mask_box, mag[-1], spacing, residual)
        holes = lesion_holes(mask_box, mag[-1], spacing, residual) & vmask
        if INPAINT_LESION_HOLES and holes.any():
            total = inpaint_harmonic(total, holes)
    else:
        vmask = trim_dark_edge(mask_box, mag[-1], spacing)  # last echo: bone partial volume darkest
    field_in = np.where(vmask, total, 0.0)
    if bg_method == "pdf":
        local, eroded = pdf(field_in, vmask, spacing, b0, device=device)
    elif bg_method == "lbv":
        local, eroded = lbv(field_in, vmask, spacing, device=device)
    else:
        local, eroded = vsharp(field_in, vmask, spacing, device=device)
    timings[bg_method] = time.perf_counter() - t

    t = time.perf_counter()
    if method == "star":
        w = data_weights(eroded, spacing) if DATA_WEIGHTING else None
        chi = star_qsm(local, eroded, spacing, b0, device=device, weights=w)
    else:
        chi = tkd(local, eroded, spacing, b0, device=device)
    chi = np.where(eroded, chi - chi[eroded].mean(), 0.0).astype(np.float32)
    timings[method] = time.perf_counter() - t
    timings["total"] = sum(timings.values())

    def full(a: np.ndarray) -> np.ndarray:
        out = np.zeros(full_shape, dtype=a.dtype)
        out[box] = a
        return out

    if unwrap_corrected:
        log.warning("unwrapping: %d voxels of the first echo difference were one or more cycles off "
                    "(a field jump over pi between neighbours) and were corrected from echo 1", unwrap_corrected)
    return QSMResult(full(chi), mask, full(eroded), full(local), full(total), timings, method,
                     unwrap_corrected_voxels=unwrap_corrected, background=bg_method)
