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
