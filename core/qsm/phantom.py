"""A small synthetic head for testing and timing the QSM chain (not the product's simulator).

Nested ellipsoids in millimetres around the volume centre: brain (white matter core, grey matter
shell, two deep grey nuclei, two ventricles, a CSF rim, one vein, microbleeds and a calcification),
a dark bone shell, a bright scalp, air outside and a frontal sinus (air) below the brain.
Susceptibility is relative to air (tissue about -9.4 ppm), so the field has a realistic several-ppm
background.
All edges are smoothed slightly (Gaussian, 0.7 voxel) so that the band-limited k-space field has no
far-reaching staircase ringing (which is not harmonic inside the brain and defeats V-SHARP).
Signal: ``m exp(-R2* TE) exp(i phase) + complex noise`` with a smooth receiver phase offset; phase
follows core.physics (positive chi -> positive phase).

Used by ``tests/unit/test_qsm_*.py`` and by ``bench/qsm_speed.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from core.physics import field_to_phase, forward_field_ppm

AIR_TO_TISSUE_PPM = -9.4


@dataclass
class HeadPhantom:
    magnitude: np.ndarray  # [e, i, j, k]
    phase_rad: np.ndarray  # [e, i, j, k], wrapped
    brain_mask: np.ndarray  # [i, j, k] bool
    chi_brain_ppm: np.ndarray  # susceptibility inside the brain (relative to the brain's own mean)
    total_field_ppm: np.ndarray
    local_field_ppm: np.ndarray  # field of the brain's own sources (inside the brain)
    echo_times_s: list[float]
    field_strength_t: float
    spacing_mm: tuple[float, float, float]
    lesions: list[tuple[tuple[float, float, float], float, float]]  # (centre mm, radius mm, chi ppm)


def _ell(coords: Sequence[np.ndarray], centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    return sum(((c - o) / a) ** 2 for c, o, a in zip(coords, centre, axes))


def head_phantom(
    shape: Sequence[int] = (96, 112, 80),
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    echo_times_s: Sequence[float] = (0.006, 0.012, 0.018, 0.024),
    field_strength_t: float = 3.0,
    snr: float = 60.0,
    brain_scale: float = 1.0,
    seed: int = 0,
) -> HeadPhantom:
    """Build the phantom; the brain's semi-axes are 34 %, 36 % and 40 % of the field of view."""
    shape = tuple(int(n) for n in shape)
    sp = np.asarray(spacing_mm, dtype=np.float64)
    fov = np.asarray(shape) * sp
    coords = [(np.arange(n) - (n - 1) / 2.0).reshape([-1 if a == ax else 1 for a in range(3)]) * sp[ax]
              for ax, n in enumerate(shape)]
    coords = [np.broadcast_to(c, shape) for c in coords]
    axes = np.array([0.34, 0.36, 0.40]) * fov * brain_scale
    zero = (0.0, 0.0, 0.0)
    brain = _ell(coords, zero, axes) <= 1.0
    inner = _ell(coords, zero, axes + 2.0) <= 1.0
    meninges = inner & ~brain  # 2 mm dura and inner table: dark
    bone = (_ell(coords, zero, axes + 7.0) <= 1.0) & ~inner
    head = _ell(coords, zero, axes + 13.0) <= 1.0
    scalp = head & ~bone & ~inner
    sinus = _ell(coords, (0.0, -0.8 * axes[1], -0.55 * axes[2]), (12.0, 9.0, 8.0)) <= 1.0
    sinus &= ~(_ell(coords, zero, axes + 4.0) <= 1.0)  # air, at least 4 mm from the brain

    chi = np.zeros(shape, np.float32)
    mag = np.zeros(shape, np.float32)
    r2s = np.zeros(shape, np.float32)
    wm = _ell(coords, zero, axes * 0.78) <= 1.0
    gm = brain & ~wm
    chi[gm], mag[gm], r2s[gm] = 0.03, 0.85, 18.0
    chi[wm], mag[wm], r2s[wm] = -0.03, 0.75, 22.0
    deep = []
    for sx in (-1, 1):
        deep.append(((sx * 0.25 * axes[0], 0.05 * axes[1], -0.05 * axes[2]), (8.0, 10.0, 7.0), 0.12, 0.8, 35.0))
        deep.append(((sx * 0.12 * axes[0], -0.05 * axes[1], 0.12 * axes[2]), (4.0, 14.0, 6.0), 0.0, 1.0, 4.0))
    for c, ax, x, m, r in deep:
        sel = _ell(coords, c, ax) <= 1.0
        chi[sel], mag[sel], r2s[sel] = x, m, r
    rim = brain & ~(_ell(coords, zero, axes - 2.5) <= 1.0)
    chi[rim], mag[rim], r2s[rim] = 0.0, 1.0, 4.0
    # a vein along j near the top of the brain
    vein = (((coords[0] - 0.1 * axes[0]) ** 2 + (coords[2] - 0.55 * axes[2]) ** 2) <= 1.5**2) & brain
    chi[vein], mag[vein], r2s[vein] = 0.45, 0.5, 60.0
    lesions = [
        ((0.45 * axes[0], 0.3 * axes[1], 0.1 * axes[2]), 2.5, 0.9),
        ((-0.4 * axes[0], -0.35 * axes[1], 0.2 * axes[2]), 1.8, 0.7),
        ((0.35 * axes[0], -0.45 * axes[1], -0.25 * axes[2]), 2.5, -0.6),
    ]
    for c, rad, x in lesions:
        sel = _ell(coords, c, (rad, rad, rad)) <= 1.0
        chi[sel], mag[sel], r2s[sel] = x, 0.3, 150.0
    # Every edge is smoothed once (Gaussian, 0.7 voxel) before the k-space forward model: a staircase
    # edge has a k-space field with Gibbs ringing that reaches into the brain and is not harmonic there
    # (a 9.4 ppm air/tissue edge made V-SHARP fail for oblique B0 in our tests).
    chi_brain = ndi.gaussian_filter(np.where(brain, chi, 0.0).astype(np.float32), 0.7)

    chi_all = np.where(brain, chi + AIR_TO_TISSUE_PPM, 0.0)
    chi_all[meninges] = AIR_TO_TISSUE_PPM
    chi_all[bone] = AIR_TO_TISSUE_PPM - 2.0
    chi_all[scalp] = AIR_TO_TISSUE_PPM + 0.5
    chi_all[sinus] = 0.0
    mag[meninges], r2s[meninges] = 0.1, 40.0
    mag[bone], r2s[bone] = 0.04, 300.0
    mag[scalp], r2s[scalp] = 0.9, 30.0
    mag[sinus] = 0.0

    chi_all = ndi.gaussian_filter(chi_all.astype(np.float32), 0.7)
    total = forward_field_ppm(chi_all, sp, b0_direction)
    local = forward_field_ppm(chi_brain, sp, b0_direction)
    rng = np.random.default_rng(seed)
    xn = [c / (fov[a] / 2.0) for a, c in enumerate(coords)]
    offset = 0.6 * xn[0] - 0.4 * xn[1] + 0.5 * xn[2] ** 2 + 0.3
    sigma = 1.0 / snr
    mags, phases = [], []
    for te in echo_times_s:
        ph = field_to_phase(total, te, field_strength_t) + offset
        s = mag * np.exp(-r2s * te) * np.exp(1j * ph)
        s = s + sigma * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape))
        mags.append(np.abs(s).astype(np.float32))
        phases.append(np.angle(s).astype(np.float32))
    ref = chi_brain[brain].mean()
    return HeadPhantom(
        magnitude=np.stack(mags),
        phase_rad=np.stack(phases),
        brain_mask=brain,
        chi_brain_ppm=np.where(brain, chi_brain - ref, 0.0).astype(np.float32),
        total_field_ppm=total,
        local_field_ppm=np.where(brain, local, 0.0).astype(np.float32),
        echo_times_s=[float(t) for t in echo_times_s],
        field_strength_t=float(field_strength_t),
        spacing_mm=tuple(float(v) for v in sp),
        lesions=[(tuple(float(v) for v in c), float(r), float(x)) for c, r, x in lesions],
    )
