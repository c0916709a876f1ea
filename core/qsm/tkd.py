"""Truncated k-space division (TKD; Shmueli et al., MRM 2009;62:1510; Wharton et al., MRM 2010).

The local field is the susceptibility convolved with the unit dipole,
``F f = D F chi``, ``D(k) = 1/3 - (k . b0)^2 / |k|^2`` (``core.physics.dipole_kernel``, with the true
B0 direction ``b0`` in the array frame, so oblique slices are handled). TKD inverts it with::

    chi = IFFT[ D_inv(k) F f ],   D_inv = 1/D where |D| > t, else sign(D)/t,   t = 0.15      (1)

(as QSM.jl ``direct.jl``; ``D(0) = 0`` so the constant is undetermined and the result is referenced
by the caller). The known underestimation of TKD is not corrected here.

Units: field in ppm -> chi in ppm; voxel size in mm. The field is zero outside ``mask``; the volume is
cropped to the mask's bounding box and zero-padded by ``pad_mm`` so periodic copies stay away. FFTs
run in ``torch.fft`` (float32) on ``device``. Also provides :class:`DipoleProblem`, the padded
operator STAR-QSM uses.

Written by hand: a few lines; no permissively licensed Python package provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from core.errors import ReconstructionError
from core.physics import dipole_kernel
from core.qsm._fft import fast_padded_shape, mask_bbox, pad_to, pad_voxels_for, resolve_device


@dataclass
class DipoleProblem:
    """The field, mask and dipole kernel on a cropped, zero-padded grid (torch, float32)."""

    field: torch.Tensor  # padded field (ppm), zero outside the mask
    mask: torch.Tensor  # padded mask, float32 0/1
    kernel: torch.Tensor  # rfftn half-spectrum of D on the padded grid
    pshape: tuple[int, int, int]
    crop: tuple[slice, ...]  # padded -> box
    box: tuple[slice, ...]  # box -> full volume
    full_shape: tuple[int, int, int]
    data_weight: torch.Tensor | None = None  # padded W**2 for a weighted data term (None: the mask)

    @property
    def fidelity(self) -> torch.Tensor:
        """Per-voxel weight of the squared field residual: ``W**2`` inside the mask (default 1)."""
        return self.mask if self.data_weight is None else self.data_weight

    @classmethod
    def build(
        cls,
        local_field_ppm: np.ndarray,
        mask: np.ndarray,
        spacing_mm: Sequence[float],
        b0_direction: Sequence[float],
        *,
        pad_mm: float = 16.0,
        device=None,
        weights: np.ndarray | None = None,
    ) -> "DipoleProblem":
        """``weights`` (optional, >= 0, same shape): the data term's per-voxel weight ``W`` (its
        square multiplies the squared residual); zero outside ``mask`` whatever is passed."""
        dev = resolve_device(device)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != np.shape(local_field_ppm):
            raise ReconstructionError("mask and field maps have different shapes")
        if not mask.any():
            raise ReconstructionError("brain mask is empty; cannot compute susceptibility")
        box = mask_bbox(mask, (1, 1, 1))
        sub = tuple(s.stop - s.start for s in box)
        pshape = fast_padded_shape(sub, pad_voxels_for(spacing_mm, pad_mm))
        f = np.where(mask, local_field_ppm, 0.0).astype(np.float32)[box]
        ft, crop = pad_to(torch.as_tensor(f, device=dev), pshape)
        mt, _ = pad_to(torch.as_tensor(mask[box].astype(np.float32), device=dev), pshape)
        d = dipole_kernel(pshape, spacing_mm, b0_direction, half=True, device=dev)
        dw = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float32)
            if w.shape != mask.shape:
                raise ReconstructionError("data weights and mask have different shapes")
            if not np.all(np.isfinite(w[mask])) or (w[mask] < 0).any():
                raise ReconstructionError("data weights must be finite and non-negative")
            dw, _ = pad_to(torch.as_tensor(np.where(mask, w * w, 0.0).astype(np.float32)[box], device=dev), pshape)
        return cls(ft, mt, d, pshape, crop, box, tuple(mask.shape), dw)

    def forward(self, chi: torch.Tensor) -> torch.Tensor:
        """Field (ppm) of ``chi`` (ppm) on the padded grid: ``IFFT[D FFT chi]`` (self-adjoint)."""
        spec = torch.fft.rfftn(chi)
        spec.mul_(self.kernel)
        return torch.fft.irfftn(spec, s=self.pshape)

    def to_volume(self, x: torch.Tensor) -> np.ndarray:
        """Padded tensor -> full-size float32 numpy, zero outside the box."""
        out = np.zeros(self.full_shape, dtype=np.float32)
        out[self.box] = x[self.crop].cpu().numpy()
        return out


def tkd_inverse_kernel(kernel: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """Eq. (1): ``1/D`` where ``|D| > t``, else ``sign(D)/t`` (0 where ``D = 0``)."""
    safe = torch.where(kernel.abs() > threshold, kernel, torch.ones_like(kernel))
    return torch.where(kernel.abs() > threshold, 1.0 / safe, torch.sign(kernel) / threshold)


def tkd(
    local_field_ppm: np.ndarray,
    mask: np.ndarray,
    spacing_mm: Sequence[float],
    b0_direction: Sequence[float] = (0.0, 0.0, 1.0),
    *,
    threshold: float = 0.15,
    pad_mm: float = 16.0,
    device=None,
) -> np.ndarray:
    """Susceptibility (ppm) by eq. (1), zero outside ``mask``; not referenced (caller does that)."""
    prob = DipoleProblem.build(local_field_ppm, mask, spacing_mm, b0_direction, pad_mm=pad_mm, device=device)
    spec = torch.fft.rfftn(prob.field) * tkd_inverse_kernel(prob.kernel, threshold)
    chi = torch.fft.irfftn(spec, s=prob.pshape)
    chi = chi * prob.mask
    return prob.to_volume(chi)
