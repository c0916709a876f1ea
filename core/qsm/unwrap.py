"""Laplacian phase unwrapping (Schofield & Zhu, Opt. Lett. 2003;28:1194; Li et al., NeuroImage 2011).

The Laplacian of the true phase is computed from the wrapped phase, where wraps do not show::

    lap(phi) = cos(phi) lap(sin phi) - sin(phi) lap(cos phi)                       (1)

and the unwrapped phase is the inverse Laplacian, done in k-space::

    phi = IFFT[ FFT(lap phi) / L(k) ],   L(k) = sum_i 2 (cos(2 pi k_i / N_i) - 1) / dx_i^2,  (2)

with the ``k = 0`` term set to 0 (the constant is lost). ``L(k)`` is the symbol of the discrete
7-point Laplacian, so (1) is evaluated with the same discrete operator. With that operator (1) is
exactly ``sum_n sin(phi_n - phi) / dx^2`` over the six neighbours ``n``: that is how it is computed
here (cheaper than two extra FFTs, same numbers). ``method="wrapped_diff"`` uses
``sum_n wrap(phi_n - phi) / dx^2`` instead, which is exact while neighbour differences stay below
pi (``sin`` shrinks any difference above ~0.5 rad: a phase rising 1.3 rad per voxel comes out
~25 % low, which hits late echoes near veins and sinuses). ``"wrapped_diff"`` is the default for that
reason; ``"sincos"`` (the published form, as in STI Suite, the reference chain of Xia et al. 2023)
stays available and agrees with it where the phase is smooth.

Parameters and units: phase in radians, voxel size in mm (anisotropic voxels are handled by the
``dx_i``), ``pad_mm`` zero padding around the volume (STI Suite pads 12 voxels) so the periodic
FFT boundary is away from the head. The result is defined up to a constant (and, where the wrapped
phase is pure noise, up to a smooth harmonic error that background removal takes out).

Written by hand: no permissively licensed Python package provides it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core.physics import kspace_grid
from core.qsm._fft import fast_padded_shape, pad_to, pad_voxels_for, resolve_device


def laplacian_symbol(
    shape: Sequence[int], spacing_mm: Sequence[float], *, half: bool = True, device=None
) -> torch.Tensor:
    """Eq. (2): symbol of the discrete Laplacian, ``sum_i 2(cos(2 pi k_i/N_i) - 1)/dx_i^2`` (1/mm^2)."""
    k = kspace_grid(shape, spacing_mm, half=half, device=device)  # cycles/mm = k_i / (N_i dx_i)
    sym = 0.0
    for ki, dx in zip(k, spacing_mm):
        sym = sym + 2.0 * (torch.cos(2.0 * np.pi * ki * float(dx)) - 1.0) / float(dx) ** 2
    return sym.to(torch.float32)


def wrapped_laplacian(
    phase: torch.Tensor, spacing_mm: Sequence[float], method: str = "wrapped_diff"
) -> torch.Tensor:
    """Eq. (1) on a (padded) 3-D wrapped phase with periodic boundaries (rad/mm^2)."""
    if method == "sincos":
        g = torch.sin
    elif method == "wrapped_diff":
        def g(d: torch.Tensor) -> torch.Tensor:
            return torch.remainder(d + np.pi, 2.0 * np.pi) - np.pi
    else:
        raise ValueError(f"unknown Laplacian method {method!r}")
    out = torch.zeros_like(phase)
    # sin and wrap are odd, so each backward difference is minus the shifted forward one
    for ax, dx in enumerate(spacing_mm):
        fwd = g(torch.roll(phase, -1, dims=ax) - phase)  # g(phi[i+1] - phi[i])
        out += (fwd - torch.roll(fwd, 1, dims=ax)) / float(dx) ** 2
    return out


def laplacian_unwrap(
    phase_rad: np.ndarray,
    spacing_mm: Sequence[float],
    *,
    pad_mm: float = 12.0,
    method: str = "wrapped_diff",
    device=None,
) -> np.ndarray:
    """Unwrap a wrapped phase ``[i, j, k]`` or echo stack ``[e, i, j, k]`` (radians, float32 out).

    Each echo is unwrapped on its own; each result has an arbitrary constant (its mean over the
    padded grid is zero).
    """
    dev = resolve_device(device)
    ph = torch.as_tensor(np.asarray(phase_rad, dtype=np.float32), device=dev)
    squeeze = ph.ndim == 3
    if squeeze:
        ph = ph[None]
    if ph.ndim != 4:
        raise ValueError(f"phase must be 3-D or 4-D, got shape {tuple(ph.shape)}")
    shape = tuple(ph.shape[1:])
    pshape = fast_padded_shape(shape, pad_voxels_for(spacing_mm, pad_mm))
    sym = laplacian_symbol(pshape, spacing_mm, half=True, device=dev)
    inv = torch.where(sym == 0, torch.zeros_like(sym), 1.0 / torch.where(sym == 0, torch.ones_like(sym), sym))
    out = torch.empty_like(ph)
    for e in range(ph.shape[0]):
        padded, sl = pad_to(ph[e], pshape)
        lap = wrapped_laplacian(padded, spacing_mm, method)
        spec = torch.fft.rfftn(lap)
        spec *= inv
        out[e] = torch.fft.irfftn(spec, s=pshape)[sl]
    out = out.cpu().numpy()
    return out[0] if squeeze else out


def path_unwrap(phase_rad: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Quality-guided path-following unwrapping of one 3-D wrapped phase inside ``mask`` (radians).

    Reliability-sorting algorithm of Herraez et al., Appl. Opt. 2002;41:7437 (3-D: Abdul-Rahman et
    al., Appl. Opt. 2007;46:6623) as implemented by ``skimage.restoration.unwrap_phase``: voxels are
    joined in order of the smoothness of their wrapped second differences, so noisy and
    fast-varying regions are unwrapped last and their errors stay local (unlike the Laplacian
    method, whose errors spread smoothly). The result is congruent with the input
    (``result - phase`` is a multiple of 2 pi in every voxel) and 0 outside ``mask``; each connected
    component of ``mask`` has its own arbitrary multiple of 2 pi. The reliability ignores voxel size.
    """
    from skimage.restoration import unwrap_phase

    ph = np.asarray(phase_rad, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if ph.ndim != 3 or m.shape != ph.shape:
        raise ValueError(f"path_unwrap needs a 3-D phase and a mask of the same shape, got {ph.shape}, {m.shape}")
    out = unwrap_phase(np.ma.array(ph, mask=~m))
    return np.asarray(np.ma.filled(out, 0.0), dtype=np.float32)
