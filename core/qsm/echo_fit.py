"""Multi-echo combination: unwrapped phases -> one field map (ppm of B0).

Model (monopolar readout): ``phi_j(x) = phi_0(x) + 2 pi df(x) TE_j``. Magnitude-weighted least
squares through the origin (as QSM.jl ``multi_echo.jl``)::

    2 pi df = sum_j w_j^2 TE_j phi_j / sum_j w_j^2 TE_j^2,   w_j = magnitude of echo j      (1)

``phi_0`` (receiver / coil-combination phase offset) is not a field and biases (1) unless removed.
Two ways, both implemented:

* ``offset="conj_echo1"`` (default with >= 2 echoes): multiply every later echo by conj(echo 1)
  *before* unwrapping, ``psi_j = angle(exp(i phi_j) exp(-i phi_1))`` for ``j >= 2``, and fit (1)
  against ``TE_j - TE_1``. ``phi_0`` cancels exactly, and the differences also have fewer wraps.
  The weight is the inverse noise SD of a phase difference, ``w_j = m_1 m_j / sqrt(m_1^2 + m_j^2)``.
  Default because Laplacian unwrapping cannot tell ``phi_0`` from field: its non-harmonic part
  would survive background removal and appear as susceptibility.
* ``offset="none"``: fit (1) on the echoes themselves (also the only option with one echo, where
  ``phi_0`` is assumed to be zero).

Laplacian unwrapping returns each echo up to its own constant ``c_j``. Through the origin, constants
not proportional to ``TE`` would leak into the fit with spatially varying weights, so each unwrapped
echo's mean inside the brain mask is removed first: the true in-mask mean is ``2 pi mean(df) TE_j``,
proportional to ``TE_j``, so after the removal the fit is exact up to one constant field offset,
which background field removal discards.

Units: phase in radians, echo times in seconds, field strength in tesla; the field is returned in ppm
by ``core.physics.phase_to_field_ppm`` (``ppm = omega / (2 pi gamma_bar B0) * 1e6``).

Temporal unwrapping (``temporal_unwrap``; as in MEDI's / SEPIA's "nonlinear fit then unwrap the
later echoes against the predicted phase" and the ROMEO paper's temporal unwrapping, Dymerska et
al., MRM 2021;85:2294): only the first (shortest) echo difference is unwrapped spatially; later
echoes are unwrapped against the phase predicted from it::

    u_j = p_j + wrap(psi_j - p_j),   p_j = omega * TE_j                                       (2)

with ``omega`` the current frequency estimate (first ``u_1 / TE_1``, then the fit (1) of all unwrapped
echoes, iterated). It needs ``|2 pi df| * (TE_j - p_j error)`` below pi only per voxel, not per voxel
*step*, so later echoes whose phase wraps many times between neighbouring voxels (near sinuses, the
skull base) are unwrapped where any spatial method fails. ``fit_residual_rad`` is the weighted RMS
misfit of (1), a quality map (large where the model or the unwrapping fails).

Written by hand: a few lines of numpy; no library does it with these conventions.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from core.physics import phase_to_field_ppm


def remove_phase_offset(
    phase_rad: np.ndarray, magnitude: np.ndarray, echo_times_s: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echo-1-referenced wrapped phase differences for echoes 2..n.

    Returns ``(psi [e-1, i, j, k] wrapped to [-pi, pi), weights [e-1, i, j, k], dte_s [e-1])``.
    """
    ph = np.asarray(phase_rad, dtype=np.float32)
    mag = np.asarray(magnitude, dtype=np.float32)
    te = np.asarray(echo_times_s, dtype=np.float64)
    if ph.shape[0] < 2:
        raise ValueError("phase offset removal needs at least two echoes")
    psi = np.remainder(ph[1:] - ph[:1] + np.pi, 2.0 * np.pi).astype(np.float32) - np.float32(np.pi)
    m1 = mag[:1]
    mj = mag[1:]
    w = (m1 * mj / np.sqrt(np.maximum(m1**2 + mj**2, 1e-30))).astype(np.float32)
    return psi, w, te[1:] - te[0]


def fit_frequency_rad_s(
    unwrapped_rad: np.ndarray,
    weights: np.ndarray,
    echo_times_s: Sequence[float],
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Eq. (1): weighted LS slope through the origin, in rad/s, ``[i, j, k]`` float32.

    With ``mask`` each echo's mean inside the mask is removed first (see module docstring).
    """
    phi = np.asarray(unwrapped_rad, dtype=np.float32)
    w2 = np.asarray(weights, dtype=np.float32) ** 2
    te = np.asarray(echo_times_s, dtype=np.float64)
    if phi.ndim == 3:
        phi = phi[None]
        w2 = w2[None] if w2.ndim == 3 else w2
    if phi.shape[0] != te.size or w2.shape != phi.shape:
        raise ValueError("unwrapped phase, weights and echo times disagree in echo count or shape")
    num = np.zeros(phi.shape[1:], dtype=np.float32)
    den = np.zeros(phi.shape[1:], dtype=np.float32)
    for j in range(te.size):
        p = phi[j]
        if mask is not None:
            p = p - np.float32(p[mask].mean())
        num += w2[j] * np.float32(te[j]) * p
        den += w2[j] * np.float32(te[j] ** 2)
    out = np.zeros_like(num)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def fit_field_ppm(
    unwrapped_rad: np.ndarray,
    weights: np.ndarray,
    echo_times_s: Sequence[float],
    field_strength_t: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Eq. (1) converted to ppm of B0 (``field_strength_t`` in tesla)."""
    omega = fit_frequency_rad_s(unwrapped_rad, weights, echo_times_s, mask)
    return np.asarray(phase_to_field_ppm(omega, 1.0, float(field_strength_t)), dtype=np.float32)


def _wrap(x: np.ndarray) -> np.ndarray:
    return (np.remainder(x + np.pi, 2.0 * np.pi) - np.pi).astype(np.float32)


def temporal_unwrap(
    wrapped_rad: np.ndarray,
    first_unwrapped_rad: np.ndarray,
    weights: np.ndarray,
    echo_times_s: Sequence[float],
    mask: np.ndarray,
    iterations: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (2): unwrap echoes ``2..n`` of ``wrapped_rad [e, i, j, k]`` against the phase predicted from
    the (spatially) unwrapped first echo ``first_unwrapped_rad [i, j, k]``, then refine the prediction
    with fit (1) ``iterations`` times. Returns ``(unwrapped [e, i, j, k], omega_rad_s [i, j, k])``.

    A constant error of the first echo's unwrapping (2 pi k) would shift each prediction by a
    constant; each echo's residual is therefore wrapped around its circular mean inside ``mask`` so a
    constant never splits the residual at +-pi.
    """
    psi = np.asarray(wrapped_rad, dtype=np.float32)
    w = np.asarray(weights, dtype=np.float32)
    te = np.asarray(echo_times_s, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if psi.ndim != 4 or psi.shape[0] != te.size or w.shape != psi.shape:
        raise ValueError("wrapped phase, weights and echo times disagree in echo count or shape")
    un = np.empty_like(psi)
    un[0] = np.asarray(first_unwrapped_rad, dtype=np.float32)
    omega = (un[0] / np.float32(te[0])).astype(np.float32)
    for _ in range(max(1, int(iterations))):
        for j in range(1, te.size):
            pred = omega * np.float32(te[j])
            r = psi[j] - pred
            c = np.float32(np.angle(np.exp(1j * r[m].astype(np.float64)).sum())) if m.any() else np.float32(0)
            un[j] = pred + c + _wrap(r - c)
        omega = fit_frequency_rad_s(un, w, te)
    return un, omega


def fit_residual_rad(
    unwrapped_rad: np.ndarray, weights: np.ndarray, echo_times_s: Sequence[float], omega_rad_s: np.ndarray
) -> np.ndarray:
    """Weighted RMS misfit of model (1), ``sqrt(sum w_j^2 (u_j - omega TE_j)^2 / sum w_j^2)`` (rad)."""
    u = np.asarray(unwrapped_rad, dtype=np.float32)
    w2 = np.asarray(weights, dtype=np.float32) ** 2
    te = np.asarray(echo_times_s, dtype=np.float32)
    r2 = np.zeros(u.shape[1:], dtype=np.float32)
    for j in range(te.size):
        r2 += w2[j] * (u[j] - omega_rad_s * te[j]) ** 2
    return np.sqrt(r2 / np.maximum(w2.sum(0), 1e-30)).astype(np.float32)


# Echo-1 consistency check of the first echo difference's spatial unwrapping (see
# :func:`echo1_consistency`). Tuned on qsm-forward's "simple" phantom at 7 T (TE 4/12/20/28 ms, the
# QSM-CI default), where the 0.5 ppm cylinder came out one cycle high, and checked to change nothing
# at 3 T there and on our own simulator.
ECHO1_MAX_RATIO = 0.75  # use echo 1 only when TE1 <= 0.75 (TE2 - TE1): its phase then wraps less
ECHO1_OFFSET_SIGMA_MM = 10.0  # scale of the smooth phase-offset estimate (MCPC-3D-S style)
ECHO1_MIN_REGION_VOXELS = 8  # smaller disagreeing regions are noise, not an unwrapping error
ECHO1_MAX_REGION_FRACTION = 0.25  # a "region" covering more of the brain is not a local error


def echo1_consistency(
    first_unwrapped_rad: np.ndarray,
    echo1_phase_rad: np.ndarray,
    echo1_magnitude: np.ndarray,
    te1_s: float,
    dte_s: float,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
) -> tuple[np.ndarray, int]:
    """Find and repair whole-cycle errors of the spatially unwrapped echo-2 minus echo-1 phase.

    ``first_unwrapped_rad`` (``u``) is ``2 pi df (TE2 - TE1)`` up to path-unwrapping errors: where the
    field jumps by more than pi between neighbours over ``TE2 - TE1`` (a strong source at 7 T, long
    echo spacing) a whole region comes out 2 pi k off, and nothing in ``u`` itself shows it. Echo 1
    carries the same field over the shorter ``TE1`` plus the receiver phase offset ``phi_0``, which is
    smooth. As in MCPC-3D-S (Eckstein et al., MRM 2018;79:2996), ``phi_0`` is estimated as the
    magnitude-weighted Gaussian smoothing (``ECHO1_OFFSET_SIGMA_MM``) of
    ``exp(i (phi_1 - u TE1 / dTE))`` (a region off by one cycle contributes a phasor turned by
    ``2 pi TE1 / dTE``, which shrinks the local mean more than it turns it); echo 1 minus ``phi_0`` is
    then unwrapped spatially (its jumps are ``TE1 / dTE`` times smaller) and scaled to ``dTE``:
    ``p = unwrap(phi_1 - phi_0) dTE / TE1``. Where ``u - p`` (referenced to its median) is a whole
    number ``k != 0`` of cycles within pi/2 and the voxels form a connected region of at least
    ``ECHO1_MIN_REGION_VOXELS`` covering less than ``ECHO1_MAX_REGION_FRACTION`` of the mask, ``u`` is
    corrected by ``-2 pi k`` there. Returns ``(u corrected, number of voxels corrected)``; the count is
    the flag that the spatial unwrapping met a jump over pi. Does nothing (returns ``u``, 0) unless
    ``TE1 <= ECHO1_MAX_RATIO dTE``.

    Written by hand: a few lines on top of ``skimage``'s unwrapping and ``scipy.ndimage``.
    """
    from scipy import ndimage

    from core.qsm.unwrap import path_unwrap

    u = np.asarray(first_unwrapped_rad, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if not (0 < te1_s <= ECHO1_MAX_RATIO * dte_s) or not m.any():
        return u, 0
    ratio = np.float32(te1_s / dte_s)
    w = np.where(m, np.asarray(echo1_magnitude, dtype=np.float32), 0.0)
    r = np.asarray(echo1_phase_rad, dtype=np.float32) - u * ratio
    sigma = [ECHO1_OFFSET_SIGMA_MM / float(s) for s in spacing_mm]
    re = ndimage.gaussian_filter(w * np.cos(r), sigma, mode="constant")
    im = ndimage.gaussian_filter(w * np.sin(r), sigma, mode="constant")
    phi0 = np.arctan2(im, re).astype(np.float32)
    p = path_unwrap(_wrap(np.asarray(echo1_phase_rad, dtype=np.float32) - phi0), m) / ratio
    d = u - p
    d = d - np.float32(np.median(d[m]))
    k = np.rint(d / np.float32(2 * np.pi))
    ok = m & (k != 0) & (np.abs(d - k * np.float32(2 * np.pi)) < np.float32(np.pi / 2))
    labels, n = ndimage.label(ok)
    if n == 0:
        return u, 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = (sizes >= ECHO1_MIN_REGION_VOXELS) & (sizes < ECHO1_MAX_REGION_FRACTION * m.sum())
    keep[0] = False
    fix = keep[labels]
    out = u.copy()
    out[fix] -= np.float32(2 * np.pi) * k[fix].astype(np.float32)
    return out, int(fix.sum())
