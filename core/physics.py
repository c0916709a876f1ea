"""MR physics shared by the simulator and QSM reconstruction: dipole kernel, field, phase.

Sign convention (DESIGN.md section 4, for every vendor by default)::

    phase(TE) = +2 pi * gamma_bar * B0 * field(ppm) * 1e-6 * TE  (+ offset)
    field(ppm) = IFFT[ D(k) * FFT[chi(ppm)] ],  D(k) = 1/3 - (k . b0)^2 / |k|^2,  D(0) = 0

so a positive (paramagnetic) susceptibility gives a positive field at its centre along B0 and
reconstructs positive. ``b0`` is the unit B0 vector in the array frame (``Geometry.b0_direction_ijk``),
so oblique acquisitions use the true field direction. The ``D(0) = 0`` choice is the Lorentz-sphere
corrected kernel: the field inside a uniformly magnetised sphere is zero, and outside it equals the
analytic ``chi/3 (a/r)^3 (3 cos^2 theta - 1)``.

FFTs run in ``torch.fft`` (float32) so the same code uses a GPU where one is present.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

GAMMA_BAR_HZ_PER_T = 42.576e6  # proton gyromagnetic ratio / 2 pi


def kspace_grid(
    shape: Sequence[int], spacing_mm: Sequence[float], *, half: bool = False, device=None
) -> list[torch.Tensor]:
    """Spatial-frequency coordinates (cycles/mm) per axis, broadcastable to ``shape``.

    With ``half=True`` the last axis is the non-negative half used by ``rfftn``.
    """
    out = []
    nd = len(shape)
    for ax, (n, dx) in enumerate(zip(shape, spacing_mm)):
        if half and ax == nd - 1:
            f = torch.fft.rfftfreq(n, d=float(dx), dtype=torch.float64, device=device)
        else:
            f = torch.fft.fftfreq(n, d=float(dx), dtype=torch.float64, device=device)
        view = [1] * nd
        view[ax] = -1
        out.append(f.view(view))
    return out


def dipole_kernel(
    shape: Sequence[int],
    spacing_mm: Sequence[float],
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    half: bool = False,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Unit dipole kernel in k-space, ``D = 1/3 - (k.b)^2/|k|^2`` with ``D(0) = 0``.

    Args:
        shape: array shape (i, j, k).
        spacing_mm: voxel size along each axis (anisotropic voxels handled exactly).
        b0_direction: B0 unit vector in the array frame.
        half: return the ``rfftn`` half-spectrum (last axis ``n//2 + 1``).
    """
    b = np.asarray(b0_direction, dtype=np.float64)
    b = b / np.linalg.norm(b)
    k = kspace_grid(shape, spacing_mm, half=half, device=device)
    kb = k[0] * b[0] + k[1] * b[1] + k[2] * b[2]
    k2 = k[0] ** 2 + k[1] ** 2 + k[2] ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        d = 1.0 / 3.0 - kb**2 / torch.where(k2 == 0, torch.ones_like(k2), k2)
    d = torch.where(k2 == 0, torch.zeros_like(d), d)
    return d.to(dtype)


def padded_shape(shape: Sequence[int], pad_factor: float = 2.0) -> tuple[int, ...]:
    """FFT-friendly shape at least ``pad_factor`` times ``shape`` along each axis."""
    from scipy.fft import next_fast_len

    return tuple(int(next_fast_len(int(np.ceil(n * pad_factor)), real=True)) for n in shape)


def forward_field_ppm(
    chi_ppm: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float],
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    pad_factor: float = 2.0,
    device=None,
) -> np.ndarray:
    """Relative field (ppm of B0) of a susceptibility distribution, by k-space dipole convolution.

    The volume is zero-padded (to ``pad_factor`` x its size, FFT-friendly) so that the periodic
    copies implied by the FFT are far away; what lies outside the array counts as ``chi = 0``.
    Returns float32 numpy of the input's shape.
    """
    chi = torch.as_tensor(chi_ppm, dtype=torch.float32, device=device)
    shape = tuple(chi.shape)
    pshape = padded_shape(shape, pad_factor)
    kernel = dipole_kernel(pshape, spacing_mm, b0_direction, half=True, device=chi.device)
    spec = torch.fft.rfftn(chi, s=pshape)
    spec *= kernel
    field = torch.fft.irfftn(spec, s=pshape)
    field = field[: shape[0], : shape[1], : shape[2]]
    return field.contiguous().cpu().numpy()


def ppm_to_rad_per_s(field_ppm, b0_t: float):
    """Field offset in ppm -> angular frequency (rad/s)."""
    return 2.0 * np.pi * GAMMA_BAR_HZ_PER_T * b0_t * 1e-6 * field_ppm


def field_to_phase(field_ppm, te_s: float, b0_t: float):
    """Unwrapped phase (rad) accumulated at echo time ``te_s`` by a field offset in ppm."""
    return ppm_to_rad_per_s(field_ppm, b0_t) * te_s


def phase_to_field_ppm(phase_rad, te_s: float, b0_t: float):
    """Inverse of :func:`field_to_phase`."""
    return phase_rad / (2.0 * np.pi * GAMMA_BAR_HZ_PER_T * b0_t * 1e-6 * te_s)


def wrap(phase_rad):
    """Wrap to [-pi, pi)."""
    return (np.asarray(phase_rad) + np.pi) % (2.0 * np.pi) - np.pi


def sphere_field_ppm(r_mm: np.ndarray, cos_theta: np.ndarray, radius_mm: float, chi_ppm: float):
    """Analytic field (ppm) of a uniformly magnetised sphere (Lorentz-corrected: 0 inside)."""
    r = np.asarray(r_mm, dtype=np.float64)
    out = chi_ppm / 3.0 * (radius_mm / np.maximum(r, 1e-9)) ** 3 * (3.0 * cos_theta**2 - 1.0)
    return np.where(r > radius_mm, out, 0.0)
