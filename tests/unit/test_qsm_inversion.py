"""TKD and STAR-QSM recover a sphere's susceptibility, for axial and oblique B0."""

import functools

import numpy as np
import pytest

from core.physics import forward_field_ppm
from core.qsm.star import star_qsm
from core.qsm.tkd import tkd, tkd_inverse_kernel

AXIAL = (0.0, 0.0, 1.0)
OBLIQUE = (0.0, float(np.sin(np.deg2rad(25))), float(np.cos(np.deg2rad(25))))
N, SPACING = 56, (1.0, 1.0, 1.0)


def _case(b0, noise_ppm=0.0, seed=0):
    idx = np.indices((N, N, N)).astype(np.float64)
    c = (N - 1) / 2
    brain = np.sqrt(sum((idx[a] - c) ** 2 for a in range(3))) < 24
    rs = np.sqrt((idx[0] - c - 5) ** 2 + (idx[1] - c + 3) ** 2 + (idx[2] - c) ** 2)
    sphere, core = rs < 5, rs < 3
    chi = 0.5 * sphere
    field = forward_field_ppm(chi.astype(np.float32), SPACING, b0)
    if noise_ppm:
        field = field + np.random.default_rng(seed).normal(0, noise_ppm, field.shape).astype(np.float32)
    return field, brain, sphere, core


@functools.lru_cache(maxsize=None)
def _recon(method, b0_true, b0_assumed):
    """Reconstruction of the noise-free sphere case, cached: several tests look at the same runs."""
    field, brain, _, _ = _case(b0_true)
    fn = tkd if method == "tkd" else star_qsm
    return fn(field, brain, SPACING, b0_assumed)


def _referenced(chi, brain, sphere):
    return chi - chi[brain & ~sphere].mean()


@pytest.mark.parametrize("b0", [AXIAL, OBLIQUE], ids=["axial", "oblique"])
@pytest.mark.parametrize("method", ["tkd", "star"])
def test_sphere_susceptibility_recovered_within_15_percent(method, b0):
    _, brain, sphere, core = _case(b0)
    raw = _recon(method, b0, b0)
    assert raw.dtype == np.float32 and np.all(raw[~brain] == 0)
    chi = _referenced(raw, brain, sphere)
    assert chi[sphere].mean() == pytest.approx(0.5, rel=0.15)
    assert chi[core].mean() == pytest.approx(0.5, rel=0.15)


@pytest.mark.parametrize("method", ["tkd", "star"])
def test_oblique_reconstructs_as_well_as_axial(method):
    errors = []
    for b0 in (AXIAL, OBLIQUE):
        _, brain, sphere, _ = _case(b0)
        chi = _referenced(_recon(method, b0, b0), brain, sphere)
        errors.append(abs(chi[sphere].mean() - 0.5) / 0.5)
    assert errors[1] < errors[0] + 0.03


def test_wrong_b0_direction_is_worse_than_the_true_one():
    _, brain, sphere, _ = _case(OBLIQUE)
    right = _referenced(_recon("star", OBLIQUE, OBLIQUE), brain, sphere)
    wrong = _referenced(_recon("star", OBLIQUE, AXIAL), brain, sphere)
    truth = 0.5 * sphere
    err = [np.linalg.norm((x - truth)[brain]) for x in (right, wrong)]
    assert err[0] < 0.7 * err[1]


def test_star_has_less_streaking_than_tkd_on_noisy_field():
    field, brain, sphere, _ = _case(AXIAL, noise_ppm=0.002)
    bg = brain & ~sphere
    sd_tkd = _referenced(tkd(field, brain, SPACING, AXIAL), brain, sphere)[bg].std()
    sd_star = _referenced(star_qsm(field, brain, SPACING, AXIAL), brain, sphere)[bg].std()
    assert sd_star < 0.6 * sd_tkd


def test_star_is_deterministic_and_bounded():
    field, brain, _, _ = _case(OBLIQUE, noise_ppm=0.002)
    reports: list = []
    a = star_qsm(field, brain, SPACING, OBLIQUE, max_iter=(5, 7), reports=reports)
    b = star_qsm(field, brain, SPACING, OBLIQUE, max_iter=(5, 7))
    np.testing.assert_array_equal(a, b)
    assert reports[0].iterations <= 5 and reports[1].iterations <= 7
    assert a.dtype == np.float32


def test_tkd_inverse_kernel_truncation():
    import torch

    d = torch.tensor([0.0, 0.1, -0.1, 0.2, -0.5, 2.0 / 3.0])
    inv = tkd_inverse_kernel(d, 0.15).numpy()
    np.testing.assert_allclose(inv, [0.0, 1 / 0.15, -1 / 0.15, 5.0, -2.0, 1.5], rtol=1e-6)


def test_explicit_device_gives_the_same_result():
    field, brain, _, _ = _case(AXIAL)
    a = star_qsm(field, brain, SPACING, AXIAL, max_iter=(3, 3))
    b = star_qsm(field, brain, SPACING, AXIAL, max_iter=(3, 3), device="cpu")
    np.testing.assert_array_equal(a, b)


def test_star_data_weights():
    """Weights of one reproduce the unweighted solve; a weight of zero on corrupted field voxels
    keeps the corruption out of the sphere's value; the rim weight ramps with depth."""
    from core.qsm.pipeline import RIM_WEIGHT_MIN, RIM_WEIGHT_MM, data_weights

    field, brain, sphere, core = _case(AXIAL)
    plain = star_qsm(field, brain, SPACING, AXIAL)
    ones = star_qsm(field, brain, SPACING, AXIAL, weights=np.ones(field.shape, np.float32))
    np.testing.assert_allclose(ones, plain, atol=1e-5)
    idx = np.indices(field.shape)
    slab = brain & (idx[2] > 34)  # a corrupted slab 6+ voxels from the sphere
    bad = np.where(slab, field + 0.2, field).astype(np.float32)
    err = {}
    for name, w in (("unweighted", None), ("weighted", np.where(slab, 0.0, 1.0).astype(np.float32))):
        chi = _referenced(star_qsm(bad, brain, SPACING, AXIAL, weights=w), brain & ~slab, sphere)
        err[name] = abs(float(chi[core].mean()) - 0.5)
    assert err["weighted"] < 0.5 * err["unweighted"] and err["weighted"] < 0.05, err
    w = data_weights(brain, SPACING)
    assert np.all(w[~brain] == 0) and w[brain].min() == pytest.approx(max(RIM_WEIGHT_MIN, 1 / RIM_WEIGHT_MM))
    centre = (N // 2,) * 3
    assert w[centre] == 1.0
    with pytest.raises(Exception, match="non-negative"):
        star_qsm(field, brain, SPACING, AXIAL, weights=-np.ones(field.shape, np.float32))
