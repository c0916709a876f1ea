"""Brain mask on a head-like phantom (bright brain, dark bone, bright scalp) and erosion in mm."""

import numpy as np
import pytest

from core.errors import ReconstructionError
from core.qsm.mask import brain_mask, dice, erode_mask
from core.qsm.phantom import head_phantom


@pytest.mark.parametrize(
    "shape, spacing", [((80, 96, 72), (1.2, 1.2, 1.2)), ((84, 100, 48), (1.0, 1.0, 2.0))], ids=["iso", "aniso"]
)
def test_mask_dice_on_head_phantom(shape, spacing):
    p = head_phantom(shape, spacing, seed=3)
    # the phantom has scalp outside a dark bone gap: a plain threshold would include it
    assert (p.magnitude[0] > 0.4)[~p.brain_mask].sum() > 0.3 * p.brain_mask.sum()
    m = brain_mask(p.magnitude, spacing)
    assert m.dtype == bool and m.shape == shape
    assert dice(m, p.brain_mask) >= 0.95


def test_mask_keeps_dark_lesions_inside_the_brain():
    p = head_phantom((80, 96, 72), (1.2, 1.2, 1.2), seed=1)
    m = brain_mask(p.magnitude, (1.2, 1.2, 1.2))
    idx = np.indices(m.shape).astype(np.float64)
    for centre, radius, _ in p.lesions:
        cv = [centre[a] / 1.2 + (m.shape[a] - 1) / 2 for a in range(3)]
        sel = sum((idx[a] - cv[a]) ** 2 for a in range(3)) <= (radius / 1.2) ** 2
        assert m[sel].all()


def test_erode_mask_by_millimetres_on_anisotropic_voxels():
    shape, spacing = (64, 64, 32), (1.0, 1.0, 2.0)
    idx = np.indices(shape).astype(np.float64)
    r = np.sqrt(sum(((idx[a] - (shape[a] - 1) / 2) * spacing[a]) ** 2 for a in range(3)))
    ball = r <= 25.0
    eroded = erode_mask(ball, 5.0, spacing)
    expected = 4 / 3 * np.pi * 20.0**3 / np.prod(spacing)
    assert eroded.sum() == pytest.approx(expected, rel=0.05)
    assert not np.any(eroded & ~ball)
    assert erode_mask(ball, 0.0, spacing).sum() == ball.sum()


def test_mask_refuses_constant_or_nan_magnitude():
    with pytest.raises(ReconstructionError, match="constant"):
        brain_mask(np.ones((32, 32, 32), np.float32), (1.0, 1.0, 1.0))
    bad = np.random.default_rng(0).random((32, 32, 32)).astype(np.float32)
    bad[3, 3, 3] = np.nan
    with pytest.raises(ReconstructionError, match="NaN"):
        brain_mask(bad, (1.0, 1.0, 1.0))


def test_dice():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True
    b[1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9375, 0.9375, 1.5)])
@pytest.mark.parametrize("border_outside", [True, False])
def test_distance_mm_equals_scipy(spacing, border_outside):
    """distance_mm (edt package) gives scipy's Euclidean distances, for both border conventions
    (a mask that touches the array border), and 0 outside the mask."""
    from scipy import ndimage as ndi

    from core.qsm.mask import distance_mm

    rng = np.random.default_rng(0)
    m = ndi.gaussian_filter(rng.normal(size=(40, 46, 30)), 3) > -0.02
    assert m[0].any() and not m.all()
    ref = ndi.distance_transform_edt(np.pad(m, 1) if border_outside else m, sampling=spacing)
    if border_outside:
        ref = ref[1:-1, 1:-1, 1:-1]
    d = distance_mm(m, spacing, border_outside=border_outside)
    assert d.shape == m.shape and np.all(d[~m] == 0)
    assert np.abs(d - ref).max() < 1e-5
    assert distance_mm(np.zeros((4, 4, 4), bool), spacing, border_outside=True).max() == 0
