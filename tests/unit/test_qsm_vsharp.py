"""V-SHARP removes the field of sources outside the brain and keeps the field of sources inside."""

import numpy as np
import pytest

from core.errors import ReconstructionError
from core.physics import forward_field_ppm
from core.qsm.vsharp import default_radii_mm, vsharp


def _grid(shape, spacing):
    idx = np.indices(shape).astype(np.float64)
    c = [(n - 1) / 2 for n in shape]
    return [(idx[a] - c[a]) * spacing[a] for a in range(3)]


def _blob(x, centre, sigma_mm, chi):
    """Smooth (band-limited) source: no staircase ringing in its k-space field."""
    return chi * np.exp(-sum((xa - ca) ** 2 for xa, ca in zip(x, centre)) / (2 * sigma_mm**2))


def _demeaned(a, m):
    v = a[m]
    return v - v.mean()


@pytest.mark.parametrize(
    "spacing, b0",
    [((1.0, 1.0, 1.0), (0.0, 0.0, 1.0)), ((1.0, 1.0, 1.5), (0.0, np.sin(0.35), np.cos(0.35)))],
)
def test_vsharp_removes_outside_source_keeps_inside_source(spacing, b0):
    shape = (72, 72, 52) if spacing[2] > 1 else (72, 72, 72)
    x = _grid(shape, spacing)
    r = np.sqrt(sum(xa**2 for xa in x))
    mask = r < 24.0
    outside = _blob(x, (0.0, 6.0, 34.0), 2.5, -9.0)  # 10 mm beyond the brain, like a sinus
    inside = _blob(x, (5.0, -4.0, 2.0), 2.0, 0.6)
    f_bg = forward_field_ppm(outside.astype(np.float32), spacing, b0)
    f_in = forward_field_ppm(inside.astype(np.float32), spacing, b0)
    local, eroded = vsharp(f_bg + f_in, mask, spacing)
    assert eroded.sum() > 0.9 * np.sum(r < 24.0 - max(spacing))
    assert not np.any(eroded & ~mask)
    # linear filter: the two parts can be checked one by one
    bg_left, _ = vsharp(f_bg, mask, spacing)
    residual = np.linalg.norm(_demeaned(bg_left, eroded)) / np.linalg.norm(_demeaned(f_bg, eroded))
    assert residual < 0.05
    kept = np.linalg.norm(_demeaned(local - f_in, eroded)) / np.linalg.norm(_demeaned(f_in, eroded))
    assert kept < 0.15
    assert np.all(local[~eroded] == 0)


def test_default_radii_go_from_12_mm_down_to_one_voxel():
    radii = default_radii_mm((0.9, 0.9, 2.0))
    assert radii[0] == 12.0 and radii[-1] == 2.0
    assert all(a > b for a, b in zip(radii, radii[1:]))


def test_vsharp_refuses_a_mask_too_small_for_the_kernels():
    shape, spacing = (32, 32, 32), (1.0, 1.0, 1.0)
    mask = np.zeros(shape, bool)
    mask[15:17, 15:17, 15:17] = True
    with pytest.raises(ReconstructionError, match="too small"):
        vsharp(np.zeros(shape, np.float32), mask, spacing)
