"""Hand-crafted baseline features (core.detect.handcrafted) on a sphere and a tube."""

from __future__ import annotations

import numpy as np
import pytest

from core.detect import DetectionError
from core.detect.handcrafted import component_features, passes_handcrafted


def _grid(shape: tuple[int, int, int], sp: tuple[float, float, float]) -> list[np.ndarray]:
    return np.meshgrid(*[np.arange(n) * d for n, d in zip(shape, sp)], indexing="ij")


def test_sphere_vs_tube_features() -> None:
    sp = (0.5, 0.5, 1.0)
    g = _grid((40, 40, 20), sp)
    sphere = ((g[0] - 10) ** 2 + (g[1] - 10) ** 2 + (g[2] - 10) ** 2) <= 2.5**2
    tube = (((g[0] - 10) ** 2 + (g[1] - 10) ** 2) <= 1.0**2) & (g[2] >= 2) & (g[2] <= 17)
    fs = component_features(sphere, sp)
    ft = component_features(tube, sp)
    # Sphere of radius 2.5 mm: 65.4 mm^3 analytically; voxelised close to it.
    assert fs.volume_mm3 == pytest.approx(4 / 3 * np.pi * 2.5**3, rel=0.1)
    assert fs.length_mm == pytest.approx(5.0, abs=1.0)
    assert fs.fa < 0.1
    # Tube 16 mm long (k = 2..17 mm inclusive), radius 1 mm.
    assert ft.length_mm == pytest.approx(16.0, abs=0.6)
    assert ft.fa > 0.85
    assert passes_handcrafted(fs) == (True, True, True)
    assert passes_handcrafted(ft) == (True, False, False)
    # With a looser length limit the tube still fails on FA.
    assert passes_handcrafted(ft, max_length_mm=20, max_fa=0.5) == (True, True, False)


def test_single_voxel_and_empty() -> None:
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    f = component_features(one, (1.0, 1.0, 1.0))
    assert f.volume_mm3 == 1.0 and f.fa == pytest.approx(0.0, abs=1e-9)
    assert f.length_mm == pytest.approx(1.0)
    with pytest.raises(DetectionError):
        component_features(np.zeros((3, 3, 3), bool), (1.0, 1.0, 1.0))
