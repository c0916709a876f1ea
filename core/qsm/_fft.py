"""Small helpers shared by the FFT-based QSM steps: device choice, crop-to-mask and zero padding."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.fft import next_fast_len


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CPU; anything else is passed to :class:`torch.device`."""
    return torch.device("cpu") if device is None else torch.device(device)


def fast_padded_shape(shape: Sequence[int], pad_voxels: Sequence[int]) -> tuple[int, ...]:
    """Each axis grown by ``2 * pad`` voxels and rounded up to an FFT-friendly length."""
    return tuple(int(next_fast_len(int(n) + 2 * int(p), real=True)) for n, p in zip(shape, pad_voxels))


def pad_voxels_for(spacing_mm: Sequence[float], pad_mm: float) -> tuple[int, ...]:
    """Number of voxels covering ``pad_mm`` along each axis."""
    return tuple(int(np.ceil(pad_mm / float(dx))) for dx in spacing_mm)


def pad_to(x: torch.Tensor, pshape: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the last three axes of ``x`` to ``pshape`` with the data centred.

    Returns the padded tensor and the slices that crop it back.
    """
    shape = x.shape[-3:]
    before = [(p - n) // 2 for n, p in zip(shape, pshape)]
    out = torch.zeros(tuple(x.shape[:-3]) + tuple(pshape), dtype=x.dtype, device=x.device)
    sl = tuple(slice(b, b + n) for b, n in zip(before, shape))
    out[(Ellipsis,) + sl] = x
    return out, sl


def mask_bbox(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, slice, slice]:
    """Bounding box of a non-empty boolean mask, grown by ``margin`` voxels and clipped to the array."""
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        lo = max(int(idx[0]) - int(margin[ax]), 0)
        hi = min(int(idx[-1]) + 1 + int(margin[ax]), mask.shape[ax])
        out.append(slice(lo, hi))
    return tuple(out)
