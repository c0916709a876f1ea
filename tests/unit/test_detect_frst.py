"""FRST (core.detect.frst) on synthetic disks, lines, spheres and tubes with known centres."""

from __future__ import annotations

import numpy as np
import pytest

from core.detect import DetectionError
from core.detect.frst import frst_2d, frst_25d, frst_3d


def _disk_and_line() -> np.ndarray:
    yy, xx = np.mgrid[:64, :64]
    img = ((yy - 30) ** 2 + (xx - 40) ** 2 <= 16).astype(np.float32)  # disk r = 4 at (30, 40)
    img[:, 10] = 1.0  # a vertical line (vessel) at x = 10
    return img


def sphere_and_tube(spacing: tuple[float, float, float], fov_mm: float = 32.0,
                    r_mm: float = 2.5) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Bright sphere (radius r_mm) at the centre voxel and a bright tube (radius 1.5 mm) along k."""
    shape = tuple(int(round(fov_mm / d)) for d in spacing)
    centre = tuple(n // 2 for n in shape)
    g = np.meshgrid(*[np.arange(n) * d for n, d in zip(shape, spacing)], indexing="ij")
    c_mm = [c * d for c, d in zip(centre, spacing)]
    vol = (sum((gi - ci) ** 2 for gi, ci in zip(g, c_mm)) <= r_mm**2).astype(np.float32)
    vol[((g[0] - 8.0) ** 2 + (g[1] - 8.0) ** 2) <= 1.5**2] = 1.0
    return vol, centre


def test_2d_peaks_at_disk_centre_not_on_line() -> None:
    s = frst_2d(_disk_and_line(), radii=[4])
    assert np.unravel_index(np.argmax(s), s.shape) == (30, 40)
    assert s[:, 7:14].max() < 0.01 * s.max()


def test_2d_radius_selectivity_and_offsets_not_floored() -> None:
    img = _disk_and_line()
    # The floor-division bug votes only at offsets {-n, 0}: the peak moves off centre by ~n/2.
    for r in (3, 4, 5):
        s = frst_2d(img, radii=[r])
        peak = np.unravel_index(np.argmax(s), s.shape)
        assert abs(peak[0] - 30) <= 1 and abs(peak[1] - 40) <= 1
    # The matching radius responds more than a far-off one.
    assert frst_2d(img, radii=[4])[30, 40] > 3 * frst_2d(img, radii=[12])[30, 40]


def test_2d_dark_mode_finds_dark_disk() -> None:
    img = 1.0 - _disk_and_line()
    s = frst_2d(img, radii=[4], mode="dark")
    assert np.unravel_index(np.argmax(s), s.shape) == (30, 40)


def test_25d_sphere_beats_tube_isotropic() -> None:
    vol, c = sphere_and_tube((1.0, 1.0, 1.0))
    f = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0))
    assert f.shape == vol.shape and f.dtype == np.float32
    assert np.unravel_index(np.argmax(f), f.shape) == c
    assert f.max() == pytest.approx(1.0)
    tube = f[:12, :12].max()
    assert tube < 0.05 * f[c]  # measured about 0.0035


def test_25d_anisotropic_voxels_peak_at_sphere_centre() -> None:
    sp = (0.5, 0.5, 2.0)
    vol, c = sphere_and_tube(sp)
    f = frst_25d(vol, sp, radii_mm=(1.0, 2.0, 3.0))
    peak = np.array(np.unravel_index(np.argmax(f), f.shape))
    assert np.abs(peak - np.array(c)).max() <= 1
    assert f[:24, :24].max() < 0.05 * f.max()  # the tube (measured about 0.011)


def test_3d_frst_peaks_at_sphere_and_suppresses_tube_less_than_25d() -> None:
    vol, c = sphere_and_tube((1.0, 1.0, 1.0))
    f3 = frst_3d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0))
    peak = np.array(np.unravel_index(np.argmax(f3), f3.shape))
    assert np.abs(peak - np.array(c)).max() <= 1
    f25 = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0))
    # The paper's finding: 3D FRST keeps more vessel-like false positives than 2.5D.
    assert f3[:12, :12].max() > 10 * f25[:12, :12].max()


def test_bad_input_is_refused() -> None:
    with pytest.raises(DetectionError):
        frst_25d(np.zeros((4, 4)), (1, 1, 1))
    with pytest.raises(DetectionError):
        frst_2d(np.zeros((4, 4)), radii=[])


def test_25d_mask_sets_the_scale_and_zeroes_outside() -> None:
    vol, c = sphere_and_tube((1.0, 1.0, 1.0))
    # A brighter, larger sphere outside the mask must not set the normalisation.
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in vol.shape], indexing="ij")
    big = sum((gi - ci) ** 2 for gi, ci in zip(g, (24, 24, 6))) <= 3.0**2
    vol[big] = 5.0
    mask = np.ones(vol.shape, bool)
    mask[18:, 18:, :12] = False
    f_all = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0))
    f_in = frst_25d(vol, (1.0, 1.0, 1.0), radii_mm=(1.0, 2.0, 3.0), mask=mask)
    assert f_all[c] < 0.5  # without the mask the outside sphere dominates
    assert f_in[c] == pytest.approx(1.0)
    assert not f_in[~mask].any()
    with pytest.raises(DetectionError):
        frst_25d(vol, (1.0, 1.0, 1.0), mask=mask[:-1])


def test_both_mode_is_signed_sum_of_bright_and_dark() -> None:
    img = _disk_and_line()
    img[50:55, 50:55] = -1.0  # a dark square
    both = frst_2d(img, radii=[3], mode="both")
    bright = frst_2d(img, radii=[3], mode="bright")
    peak = np.unravel_index(np.argmax(both), both.shape)
    assert peak == np.unravel_index(np.argmax(bright), bright.shape)
    assert both[52, 52] < 0 < both[30, 40]


def test_signed_pass_equals_separate_passes_on_the_negated_volume():
    """Stage I's one-pass paramagnetic + diamagnetic FRST must equal two separate calls exactly."""
    from core.detect.frst import _frst_on_axes, _frst_on_axes_signed
    rng = np.random.default_rng(5)
    vol = rng.normal(size=(18, 20, 16)).astype(np.float32)
    vol[8:11, 9:12, 7:10] += 4.0  # a bright spot
    vol[3:5, 3:5, 3:5] -= 4.0  # a dark one
    sp, radii = (1.0, 0.9, 1.3), (1.0, 2.0, 3.0)
    for axes in ((0, 1), (1, 2), (0, 1, 2)):
        for mode in ("bright", "dark", "both"):
            pos, neg = _frst_on_axes_signed(vol, sp, radii, axes, 2.0, 0.1, mode, (1, -1))
            assert np.array_equal(pos, _frst_on_axes(vol, sp, radii, axes, 2.0, 0.1, mode))
            assert np.array_equal(neg, _frst_on_axes(-vol, sp, radii, axes, 2.0, 0.1, mode))
