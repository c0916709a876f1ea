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
