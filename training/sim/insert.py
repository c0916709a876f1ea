"""Physics-based insertion of extra microbleeds into a simulated study (beyond the paper).

Xia et al. 2023 augmented their scarce positives with a CycleGAN that pastes synthetic bleeds into
QSM patches. Our simulator knows the physics, so instead we add microbleeds to the *acquired*
multi-echo data, and every later step (QSM reconstruction, stage I) sees them as it sees a real
bleed. For each inserted sphere (partial-volume fraction ``f`` per voxel, susceptibility
``chi_les``, R2* ``r2_les``):

* susceptibility change ``dchi = f (chi_les - chi_old)``; its field ``dB = D * dchi``
  (:func:`core.physics.forward_field_ppm`, the array's own B0 direction, one FFT for all inserted
  lesions, zero padded);
* phase: ``phase(TE) += field_to_phase(dB, TE, B0)``, the product polarity of
  :mod:`core.physics` (a paramagnetic sphere raises the phase along the B0 poles and lowers it
  around its equator);
* magnitude: the complex signal of each voxel becomes
  ``[(1 - f) S_old + f S_les] * prod_a |sinc(d(dB)/da TE / 2 pi)|`` with
  ``S_les = |S_old| (S0_cmb / S0_tissue) exp(-TE (r2_les - r2_tissue))`` (``S0_cmb / S0_tissue``
  = 400 / 760, ``r2_tissue`` = 21 1/s as in :mod:`training.sim.phantom`): the lesion's own signal
  and the intravoxel dephasing of the added field gradient (as :func:`training.sim.acquire.gre_echoes`
  models it). The existing noise is scaled with the signal, so complex Gaussian noise of variance
  ``sigma^2 (1 - a^2)`` (``a`` the voxel's attenuation) is added back to keep the noise level
  (``sigma`` = first-echo mean brain magnitude / SNR, the simulator's definition);
* truth: ``chi_ppm`` inside the intracranial mask, ``extra_truth['field_ppm']`` and a
  :class:`~training.sim.study.Lesion` with the MARS region read from ``extra_truth['mars_region']``
  at the centre. The side is taken from the LPS x of the centre relative to the brain mask's
  centroid (the subject-to-MNI transform is not kept in the study): ``side_from_x_ras`` of
  ``-(x - x_centroid)``, an approximation within a few mm of the midline.

Positions: inside the brain mask, at least ``min_depth_mm`` from its surface, in a MARS region,
2 mm or more from veins (``extra_truth['vein_mask']``) and other lesions, 3 voxels or more inside
the slab. ``deep_gm_fraction`` of the bleeds (drawn per bleed) go into the iron-rich deep grey
nuclei (``extra_truth['deep_gm_labels']`` > 0: caudate, putamen, pallidum, thalamus, ...): drawn
uniformly over the brain, few land there (they are a small share of its volume), yet a bleed on
an iron background is where a detector trained that way misses most (validation, issue 4).
Sizes and susceptibilities follow the simulator (2 + 8 Beta(1.3, 3.5) mm, 0.2-1.5 ppm, R2*
250-800 1/s at 3 T) unless given.
"""

from __future__ import annotations

import copy

import numpy as np
from scipy import ndimage

from core import mars
from core.physics import field_to_phase, forward_field_ppm, ppm_to_rad_per_s, wrap
from training.sim.phantom import S0, sphere_fraction
from training.sim.study import Lesion, SimulatedStudy

S0_RATIO = S0["cmb"] / (0.5 * (S0["gm"] + S0["wm"]))
R2_TISSUE_3T = 21.0


def _draw_centre(study, free, depth, rng, radius, taken, spacing):
    shape = study.geometry.shape
    cand = np.flatnonzero(free & (depth >= max(radius + 2.0, 0.0)))
    for _ in range(200):
        if not len(cand):
            return None
        v = np.array(np.unravel_index(int(cand[rng.integers(len(cand))]), shape), dtype=np.float64)
        v += rng.uniform(-0.5, 0.5, 3)
        c = study.geometry.voxel_to_patient(v)
        if all(np.linalg.norm(c - c2) >= radius + r2 + 2.0 for c2, r2 in taken):
            return c
    return None


def insert_microbleeds(
    study: SimulatedStudy,
    n: int,
    rng: np.random.Generator,
    *,
    diameter_mm: tuple[float, float] | None = None,
    chi_ppm: tuple[float, float] | None = None,
    centres_lps: np.ndarray | None = None,
    min_depth_mm: float = 6.0,
    pad_factor: float = 1.5,
    deep_gm_fraction: float = 0.0,
) -> SimulatedStudy:
    """A copy of ``study`` with ``n`` more microbleeds in its magnitude, phase and truth.

    Args:
        study: a simulated study (with ``extra_truth`` vein_mask / mars_region / field_ppm).
        n: number of microbleeds to add (fewer when no free position is found).
        rng: random generator (positions, sizes, susceptibilities, noise).
        diameter_mm: (min, max) uniform diameter; default the simulator's skewed 2-10 mm.
        chi_ppm: (min, max) uniform susceptibility (ppm); default 0.2-1.5.
        centres_lps: optional fixed centres [n, 3] (LPS mm; tests), bypassing the position draw.
        min_depth_mm: minimum distance from the brain surface.
        pad_factor: zero padding of the dipole convolution.
        deep_gm_fraction: probability that a bleed is placed in the deep grey nuclei (falls back
            to the whole brain when the study has no ``deep_gm_labels`` or no free voxel there).

    Returns:
        A new :class:`SimulatedStudy` (the input is not modified).
    """
    out = copy.copy(study)
    out.extra_truth = dict(study.extra_truth)
    out.lesions = list(study.lesions)
    geom = study.geometry
    spacing = np.asarray(geom.spacing, dtype=np.float64)
    shape = tuple(geom.shape)
    b0 = float(study.acquisition.field_strength_t)
    brain = np.asarray(study.brain_mask, bool)
    depth = ndimage.distance_transform_edt(brain, sampling=spacing)
    free = brain.copy()
    vein = study.extra_truth.get("vein_mask")
    if vein is not None and np.any(vein):
        free &= ndimage.distance_transform_edt(~np.asarray(vein, bool), sampling=spacing) > 2.0
    regions = study.extra_truth.get("mars_region")
    if regions is not None:
        free &= np.asarray(regions) > 0
    free[:, :, :3] = False
    free[:, :, -3:] = False
    free &= depth >= min_depth_mm
    deep = study.extra_truth.get("deep_gm_labels")
    free_deep = free & (np.asarray(deep) > 0) if deep is not None and deep_gm_fraction > 0 else None
    if free_deep is not None and not free_deep.any():
        free_deep = None
    taken = [(np.asarray(le.centre_lps_mm), le.diameter_mm / 2) for le in study.lesions]
    x_mid = float(geom.voxel_to_patient(np.argwhere(brain).mean(axis=0))[0]) if brain.any() else 0.0

    chi_truth = np.array(study.chi_ppm, dtype=np.float32, copy=True)
    dchi = np.zeros(shape, np.float32)
    les_frac = np.zeros(shape, np.float32)  # fraction of each voxel taken by inserted lesions
    les_r2 = np.zeros(shape, np.float32)
    new: list[Lesion] = []
    for m in range(int(n)):
        d = float(rng.uniform(*diameter_mm)) if diameter_mm else float(2.0 + 8.0 * rng.beta(1.3, 3.5))
        chi_v = float(rng.uniform(*(chi_ppm or (0.2, 1.5))))
        r2_v = float(rng.uniform(250.0, 800.0)) * b0 / 3.0
        if centres_lps is not None:
            centre = np.asarray(centres_lps, dtype=np.float64).reshape(-1, 3)[m]
        else:
            centre = None
            if free_deep is not None and rng.random() < deep_gm_fraction:
                centre = _draw_centre(study, free_deep, depth, rng, d / 2, taken, spacing)
            if centre is None:
                centre = _draw_centre(study, free, depth, rng, d / 2, taken, spacing)
            if centre is None:
                break
        res = sphere_fraction(geom, centre, d / 2)
        if res is None:
            continue
        sl, f = res
        f = np.minimum(f, 1.0 - les_frac[sl])
        dchi[sl] += f * (chi_v - chi_truth[sl])
        les_r2[sl] += f * r2_v
        les_frac[sl] += f
        taken.append((centre, d / 2))
        v = geom.patient_to_voxel(centre)
        vi = tuple(int(np.clip(round(c), 0, s - 1)) for c, s in zip(v, shape))
        reg = mars.REGION_BY_INDEX.get(int(regions[vi])) if regions is not None else None
        new.append(Lesion(
            kind="cmb",
            centre_lps_mm=tuple(float(c) for c in centre),
            centre_voxel=tuple(float(c) for c in v),
            diameter_mm=d,
            chi_ppm=chi_v,
            r2star_s=r2_v,
            mars_region=reg.key if reg else "",
            mars_category=reg.category if reg else "",
            side=mars.side_from_x_ras(-(float(centre[0]) - x_mid)),
        ))
    if not new:
        return out

    ic = study.extra_truth.get("intracranial_mask")
    ic = np.ones(shape, bool) if ic is None else np.asarray(ic, bool)
    chi_truth += np.where(ic, dchi, 0.0).astype(np.float32)
    out.chi_ppm = chi_truth
    dfield = forward_field_ppm(dchi, spacing, geom.b0_direction_ijk(), pad_factor=pad_factor)
    if "field_ppm" in out.extra_truth:
        out.extra_truth["field_ppm"] = (np.asarray(out.extra_truth["field_ppm"]) + dfield).astype(np.float32)
    grads = [np.abs(ppm_to_rad_per_s(np.gradient(dfield, axis=a), b0)).astype(np.float32) for a in range(3)]

    mag = np.asarray(study.magnitude, dtype=np.float32)
    ph = np.asarray(study.phase_rad, dtype=np.float32)
    snr = float(study.acquisition.snr)
    sigma = float(mag[0][brain].mean()) / snr if brain.any() else 0.0
    new_mag = np.empty_like(mag)
    new_ph = np.empty_like(ph)
    touched = (les_frac > 0) | np.any([g > 0 for g in grads], axis=0)
    r2_mean = np.where(les_frac > 0, les_r2 / np.maximum(les_frac, 1e-6), 0.0).astype(np.float32)
    for e, te in enumerate(study.acquisition.echo_times_s):
        te = float(te)
        s = mag[e] * np.exp(1j * ph[e]).astype(np.complex64)
        les_amp = mag[e] * np.float32(S0_RATIO) * np.exp(-te * (r2_mean - R2_TISSUE_3T * b0 / 3.0))
        les_amp = les_amp.astype(np.float32)
        s_new = (1.0 - les_frac) * s + les_frac * les_amp * np.exp(1j * ph[e])
        att = np.ones(shape, np.float32)
        for g in grads:
            att *= np.abs(np.sinc(g * np.float32(te / (2.0 * np.pi)))).astype(np.float32)
        s_new = s_new * att * np.exp(1j * field_to_phase(dfield, te, b0)).astype(np.complex64)
        # keep the noise level where the old noise was scaled down
        a = np.clip(np.abs(s_new) / np.maximum(np.abs(s), 1e-6), 0.0, 1.0)
        extra = np.sqrt(np.clip(1.0 - a * a, 0.0, 1.0)) * np.float32(sigma)
        extra = np.where(touched, extra, 0.0).astype(np.float32)
        noise = (rng.standard_normal(shape, dtype=np.float32)
                 + 1j * rng.standard_normal(shape, dtype=np.float32)) * extra
        s_new = s_new + noise
        new_mag[e] = np.abs(s_new).astype(np.float32)
        new_ph[e] = wrap(np.angle(s_new)).astype(np.float32)
    out.magnitude = new_mag
    out.phase_rad = new_ph
    out.lesions = out.lesions + new
    return out
