"""Stage I (core.detect.stage1): a bright sphere in a noisy synthetic QSM is found as a
paramagnetic candidate, a diamagnetic sphere only as a diamagnetic (calcification-mimic) candidate,
a tube scores far below both, and the per-candidate measurements are those of the spheres."""

import numpy as np
import pytest
from scipy import ndimage

from core.detect import DetectionError
from core.detect.stage1 import FEATURE_NAMES, Stage1Params, detect_candidates, robust_sigma
from core.geometry import Geometry

SHAPE = (48, 48, 40)
CMB = (16, 24, 20)
CALC = (34, 24, 20)


def _scene(seed: int = 0):
    rng = np.random.default_rng(seed)
    chi = ndimage.gaussian_filter(rng.normal(0.0, 0.04, SHAPE), 0.7).astype(np.float32)
    ii, jj, kk = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")

    def ball(c, r):
        return (ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (kk - c[2]) ** 2 <= r * r

    chi[ball(CMB, 1.6)] = 0.3  # ~3 mm microbleed
    chi[ball(CALC, 2.1)] = -0.5  # ~4 mm calcification
    chi[((ii - 24) ** 2 + (kk - 9) ** 2) <= 1.5**2] = 0.3  # vein-like tube along j
    mask = np.zeros(SHAPE, bool)
    mask[2:-2, 2:-2, 2:-2] = True
    return chi, mask, Geometry.oblique(SHAPE, (1.0, 1.0, 1.0))


def _near(vox, c, mm=2.0):
    return np.linalg.norm(np.asarray(vox) - np.asarray(c), axis=-1) <= mm


def test_finds_inserted_cmb_and_labels_calcification_diamagnetic():
    chi, mask, g = _scene()
    c = detect_candidates(chi, mask, g)
    para = ~c.diamagnetic
    hit = _near(c.voxel, CMB) & para
    assert hit.sum() == 1
    m = int(np.flatnonzero(hit)[0])
    assert c.score[m] == c.score[para].max()  # the microbleed is the strongest paramagnetic focus
    assert c.peak_chi_ppm[m] == pytest.approx(0.3, abs=0.02)
    assert 2.0 <= c.diameter_mm[m] <= 4.5
    assert np.allclose(c.lps_mm[m], g.voxel_to_patient(c.voxel[m]))
    assert c.cubes.shape == (len(c), 7, 7, 7)
    assert c.cubes[m, 3, 3, 3] == pytest.approx(c.score[m])
    # the calcification: found, diamagnetic, never paramagnetic
    near_calc = _near(c.voxel, CALC, 3.0)
    assert near_calc.any()
    assert np.all(c.diamagnetic[near_calc])
    k = int(np.flatnonzero(near_calc)[0])
    assert c.peak_chi_ppm[k] == pytest.approx(-0.5, abs=0.03)
    assert c.features().shape == (len(c), len(FEATURE_NAMES))


def test_tube_scores_far_below_spheres():
    chi, mask, g = _scene()
    c = detect_candidates(chi, mask, g, params=Stage1Params(threshold=0.05, diamagnetic=False))
    assert not c.diamagnetic.any()
    on_tube = (np.abs(c.voxel[:, 0] - 24) <= 1) & (np.abs(c.voxel[:, 2] - 9) <= 1)
    sphere = c.score[_near(c.voxel, CMB)].max()
    assert on_tube.any()
    assert c.score[on_tube].max() < 0.25 * sphere
    # the tube is vessel-like at its centre, the sphere is not
    assert c.vesselness[on_tube].max() > 3 * c.vesselness[_near(c.voxel, CMB)].max()


def test_threshold_is_invariant_to_qsm_scale():
    chi, mask, g = _scene()
    a = detect_candidates(chi, mask, g)
    b = detect_candidates(2.5 * chi, mask, g)
    assert np.array_equal(a.voxel, b.voxel)
    assert np.allclose(a.score, b.score, rtol=1e-3)
    assert b.sigma_ppm == pytest.approx(2.5 * a.sigma_ppm, rel=1e-4)


def test_erosion_excludes_the_brain_edge():
    chi, mask, g = _scene()
    chi[5, 24, 20] = 2.0  # bright focus 3 voxels inside the mask edge
    c = detect_candidates(chi, mask, g)
    assert not _near(c.voxel, (5, 24, 20), 2.0).any()
    assert not c.eroded_mask[5, 24, 20] and c.eroded_mask[24, 24, 20]


def test_refusals():
    chi, mask, g = _scene()
    with pytest.raises(DetectionError):
        detect_candidates(chi, np.zeros_like(mask), g)
    with pytest.raises(DetectionError):
        detect_candidates(chi[:-1], mask[:-1], g)
    assert robust_sigma(np.arange(10.0), np.ones(10, bool)) == pytest.approx(1.4826 * 2.5)
