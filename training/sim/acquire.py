"""Simulated multi-echo gradient-echo acquisition of a susceptibility / relaxation phantom.

Signal model per voxel and echo (complex):

    S(TE) = B1-(r) * S0(r) * exp(-TE * R2*(r)) * prod_axes |sinc(gamma_bar B0 dB/dx_a dx_a TE)|
            * exp(i [phi(TE) + phi0(r)]) + n,

* ``phi(TE) = 2 pi gamma_bar B0 field(r) TE`` with the product polarity (:mod:`core.physics`),
  ``field`` the dipole convolution of the whole head's susceptibility *relative to air*, so the
  zero padding outside the array acts as air;
* the sinc factors are the intravoxel dephasing of a linear field variation across the voxel
  (Yablonskiy & Haacke 1994 / Fernandez-Seara & Wehrli 2000 style): a field gradient g (ppm/voxel)
  spreads the phase across the voxel by ``2 pi gamma_bar B0 g TE`` and the voxel signal is
  attenuated by ``|sinc|`` of half that spread. This gives blooming around microbleeds and veins
  and signal dropout next to air;
* ``B1-`` a smooth receive bias, ``phi0`` a smooth transmit/receive phase offset, the same for
  every echo;
* ``n`` complex Gaussian noise with standard deviation ``mean brain |S(TE1)| / snr`` per channel.

Magnitude and wrapped phase are returned as ``[echo, i, j, k]`` float32.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core import physics
from core.geometry import Geometry

CHI_AIR_PPM = 9.4  # air relative to water (ppm, SI)


def compute_field_ppm(
    chi_rel_water_ppm: np.ndarray,
    geometry: Geometry,
    *,
    air_mask: np.ndarray | None = None,
    pad_factor: float = 1.5,
    threads: int = 2,
    local_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Total field (ppm) of a head whose susceptibility is given relative to water.

    The susceptibility is converted to be relative to air (``chi - 9.4`` inside the head, 0 in air)
    so the zero padding of the FFT acts as air around the head.

    ``local_mask`` (the intracranial space), used only when B0 is oblique to the array axes: its
    sources (relative to water) are convolved with the plain dipole kernel; everything else (the head
    relative to air, including the -9.4 ppm constant inside ``local_mask``) with the kernel times a
    Hann window (zero at Nyquist), see ``_field_split``. With B0 along an array axis the field is the
    plain convolution (bit-identical to before).
    """
    chi = np.asarray(chi_rel_water_ppm, dtype=np.float32) - np.float32(CHI_AIR_PPM)
    if air_mask is not None:
        chi[air_mask] = 0.0
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        b = np.abs(np.asarray(geometry.b0_direction_ijk(), dtype=np.float64))
        oblique = int(np.sum(b > 1e-6)) > 1  # only then does D(k) have cross terms (see _field_split)
        if local_mask is None or not oblique:
            field = physics.forward_field_ppm(
                chi, geometry.spacing, geometry.b0_direction_ijk(), pad_factor=pad_factor
            )
        else:
            field = _field_split(chi, np.asarray(chi_rel_water_ppm, dtype=np.float32),
                                 np.asarray(local_mask, dtype=bool), geometry, pad_factor)
    finally:
        torch.set_num_threads(prev)
    return field


def _field_split(
    chi_rel_air: np.ndarray, chi_rel_water: np.ndarray, local_mask: np.ndarray, geometry: Geometry,
    pad_factor: float,
) -> np.ndarray:
    """Field of the local sources (plain kernel) plus the background sources (Hann-windowed kernel).

    Why: with an oblique B0 the sampled kernel ``D = 1/3 - (k.b)^2/|k|^2`` has a cross term
    ``2 k_j k_k b_j b_k`` that changes sign across the Nyquist boundary of the periodic spectrum, so
    ``D`` is discontinuous there and rings at the Nyquist frequency in space. For the head's
    air/tissue and bone steps (9-11 ppm) that ringing reached far into the brain: measured on
    simulate_subject("d", 3101, 2 mm, 15 degree tilt), the field of the (physically harmonic inside
    the brain) background sources left 0.020 ppm RMS after V-SHARP inside the true brain mask, twice
    the local field's RMS, against 0.003 ppm axially. A separable Hann window
    ``prod_i cos^2(pi k_i dx_i)`` (a [1/4, 1/2, 1/4] smoothing of the background sources, zero and
    flat at Nyquist) removes it; background sources lie outside the brain, so the window changes
    their smooth field inside it very little. The local sources keep the plain kernel, so the true
    local field is exactly ``core.physics.forward_field_ppm`` of the truth susceptibility.
    """
    shape = chi_rel_air.shape
    pshape = physics.padded_shape(shape, pad_factor)
    sp = geometry.spacing
    kernel = physics.dipole_kernel(pshape, sp, geometry.b0_direction_ijk(), half=True)
    local = np.where(local_mask, chi_rel_water, np.float32(0.0)).astype(np.float32)
    background = (chi_rel_air - local).astype(np.float32)
    k = physics.kspace_grid(pshape, sp, half=True)
    window = 1.0
    for ki, dx in zip(k, sp):
        window = window * torch.cos(np.pi * ki * float(dx)) ** 2
    spec = torch.fft.rfftn(torch.as_tensor(background), s=pshape) * window.to(torch.float32)
    spec += torch.fft.rfftn(torch.as_tensor(local), s=pshape)
    spec *= kernel
    field = torch.fft.irfftn(spec, s=pshape)[: shape[0], : shape[1], : shape[2]]
    return field.contiguous().numpy()


def upsample_linear(coarse: np.ndarray, shape: Sequence[int], step: float) -> np.ndarray:
    """Separable linear interpolation of a lattice sampled every ``step`` voxels onto ``shape``.

    ``coarse`` has the lattice on its last three axes (earlier axes are carried along).
    """
    out = np.asarray(coarse, dtype=np.float32)
    lead = out.ndim - 3
    for a in range(3):
        ax = lead + a
        nc = out.shape[ax]
        n = int(shape[a])
        pos = np.arange(n, dtype=np.float64) / step
        i0 = np.clip(np.floor(pos).astype(int), 0, max(nc - 2, 0))
        w = (pos - i0).astype(np.float32)
        if nc == 1:
            out = np.repeat(out, n, axis=ax)
            continue
        view = [1] * out.ndim
        view[ax] = n
        w = w.reshape(view)
        out = np.take(out, i0, axis=ax) * (1.0 - w) + np.take(out, i0 + 1, axis=ax) * w
    return out.astype(np.float32, copy=False)


def lattice_points(shape: Sequence[int], step: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Voxel indices (3, a, b, c) of a lattice every ``step`` voxels covering ``shape``."""
    counts = tuple(int(np.ceil((n - 1) / step)) + 1 for n in shape)
    grids = np.meshgrid(*[np.arange(c) * float(step) for c in counts], indexing="ij")
    return np.stack(grids), counts


def smooth_random_field(
    geometry: Geometry, rng: np.random.Generator, *, order: int = 2, amplitude: float = 1.0, step: int = 8
) -> np.ndarray:
    """A smooth random polynomial field (up to ``order``) over the grid, ``amplitude`` at the FOV edge."""
    pts, counts = lattice_points(geometry.shape, step)
    half = (np.asarray(geometry.shape, dtype=np.float64) - 1) / 2.0
    u = [(pts[a] - half[a]) / max(half[a], 1.0) for a in range(3)]
    val = np.zeros(counts, dtype=np.float64)
    n_terms = 0
    for p in range(order + 1):
        for q in range(order + 1 - p):
            for r in range(order + 1 - p - q):
                if p + q + r == 0:
                    continue
                val += rng.normal() * u[0] ** p * u[1] ** q * u[2] ** r
                n_terms += 1
    val *= amplitude / np.sqrt(max(n_terms, 1))
    return upsample_linear(val, geometry.shape, step)


def dephasing_factors(field_ppm: np.ndarray, b0_t: float) -> list[np.ndarray]:
    """Per-axis field change across one voxel, in rad per second (used as ``|sinc(x TE / 2 pi)|``)."""
    out = []
    for a in range(3):
        g = np.gradient(field_ppm, axis=a).astype(np.float32)  # ppm per voxel
        out.append(np.abs(physics.ppm_to_rad_per_s(g, b0_t)).astype(np.float32))
    return out


def gre_echoes(
    s0: np.ndarray,
    r2star_s: np.ndarray,
    field_ppm: np.ndarray,
    echo_times_s: Sequence[float],
    b0_t: float,
    *,
    rng: np.random.Generator,
    snr: float,
    reference_mask: np.ndarray,
    receive_bias: np.ndarray | None = None,
    phase_offset_rad: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-echo GRE magnitude and wrapped phase ``[echo, i, j, k]`` (float32) with noise.

    Args:
        s0: proton-density/T1-weighted amplitude at TE = 0 (0 in air).
        r2star_s: R2* (1/s).
        field_ppm: total field (ppm).
        echo_times_s: echo times (s).
        b0_t: field strength (T).
        rng: random generator (noise).
        snr: mean magnitude of the first echo inside ``reference_mask`` over the noise sigma.
        reference_mask: voxels defining the SNR reference (the brain).
        receive_bias: multiplicative receive sensitivity (default 1).
        phase_offset_rad: echo-independent phase offset (default 0).
    """
    tes = [float(t) for t in echo_times_s]
    shape = s0.shape
    grads = dephasing_factors(field_ppm, b0_t)
    omega = physics.ppm_to_rad_per_s(field_ppm.astype(np.float32), b0_t).astype(np.float32)
    amp0 = s0.astype(np.float32)
    if receive_bias is not None:
        amp0 = amp0 * receive_bias.astype(np.float32)
    mags = np.empty((len(tes),) + shape, dtype=np.float32)
    phases = np.empty((len(tes),) + shape, dtype=np.float32)
    sigma = None
    for e, te in enumerate(tes):
        amp = amp0 * np.exp(-np.float32(te) * r2star_s.astype(np.float32))
        for g in grads:
            amp *= np.abs(np.sinc(g * np.float32(te / (2.0 * np.pi))))
        if sigma is None:
            ref = float(amp[reference_mask].mean()) if reference_mask.any() else float(amp.mean())
            sigma = ref / float(snr)
        ph = omega * np.float32(te)
        if phase_offset_rad is not None:
            ph += phase_offset_rad
        re = amp * np.cos(ph) + np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
        im = amp * np.sin(ph) + np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
        mags[e] = np.hypot(re, im)
        ph_w = np.arctan2(im, re)
        ph_w[ph_w >= np.pi] -= np.float32(2.0 * np.pi)  # [-pi, pi)
        phases[e] = ph_w
    return mags, phases
