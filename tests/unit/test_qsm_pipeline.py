"""The whole chain on a small head phantom, and its refusals of unusable input."""

import numpy as np
import pytest

from core.errors import ReconstructionError
from core.geometry import Geometry
from core.qsm import QSMResult, reconstruct
from core.qsm.mask import dice
from core.qsm.phantom import head_phantom

SHAPE, SPACING = (72, 84, 64), (1.2, 1.2, 1.2)


@pytest.fixture(scope="module", params=[0.0, 20.0], ids=["axial", "oblique20"])
def case(request):
    """Phantom and both reconstructions (computed once per geometry: the chain takes seconds)."""
    geom = Geometry.oblique(SHAPE, SPACING, request.param)
    p = head_phantom(SHAPE, SPACING, b0_direction=geom.b0_direction_ijk(), seed=2)
    args = (p.magnitude, p.phase_rad, p.echo_times_s, p.field_strength_t, geom)
    results = {m: reconstruct(*args, method=m) for m in ("star", "tkd")}
    return geom, p, results


def _lesion_core_means(p, chi):
    idx = np.indices(SHAPE).astype(np.float64)
    out = []
    for centre, radius, _ in p.lesions:
        cv = [centre[a] / SPACING[a] + (SHAPE[a] - 1) / 2 for a in range(3)]
        sel = sum(((idx[a] - cv[a]) * SPACING[a]) ** 2 for a in range(3)) <= (0.6 * radius) ** 2
        out.append(float(chi[sel].mean()))
    return np.array(out)


@pytest.mark.parametrize("method", ["star", "tkd"])
def test_chain_reconstructs_phantom(case, method):
    _, p, results = case
    r = results[method]
    assert isinstance(r, QSMResult) and r.method == method
    assert r.chi_ppm.shape == SHAPE and r.chi_ppm.dtype == np.float32
    assert dice(r.mask, p.brain_mask) >= 0.95
    assert not np.any(r.eroded_mask & ~r.mask)
    assert abs(float(r.chi_ppm[r.eroded_mask].mean())) < 1e-5  # documented reference
    assert np.all(r.chi_ppm[~r.eroded_mask] == 0)
    assert set(r.timings_s) == {"mask", "unwrap", "echo_fit", "vsharp", method, "total"}
    truth = p.chi_brain_ppm - p.chi_brain_ppm[r.eroded_mask].mean()
    em = r.eroded_mask
    nrmse = np.linalg.norm((r.chi_ppm - truth)[em]) / np.linalg.norm(truth[em])
    # Dominated by V-SHARP edge error and noise at SNR 60. Known regression on this simple phantom:
    # the default chain (temporal unwrapping, reliable mask eroded 2 mm) measured nRMSE 0.78-0.86,
    # corr 0.66-0.74, against 0.64 / 0.75-0.77 for the former Laplacian chain, although its total
    # field is 12x closer to the truth here (RMS 0.004 vs 0.048 ppm). The phantom has no bone partial
    # volume or dropout, so the erosion only takes valid edge away; on the realistic simulator
    # (bench/qsm.py) the new chain is much better. Thresholds sit just outside the measured range.
    assert nrmse < 0.92
    corr = np.corrcoef(r.chi_ppm[em], truth[em])[0, 1]
    assert corr > 0.62
    # microbleeds come out positive and the calcification negative, none weaker than a third
    got = _lesion_core_means(p, r.chi_ppm)
    want = _lesion_core_means(p, truth)
    assert np.all(np.sign(got) == np.sign(want))
    assert np.all(np.abs(got) > np.abs(want) / 3)


def test_star_recovers_strong_sources_better_than_tkd(case):
    _, p, results = case
    star, tkd = results["star"], results["tkd"]
    assert np.array_equal(star.eroded_mask, tkd.eroded_mask)
    truth = _lesion_core_means(p, p.chi_brain_ppm - p.chi_brain_ppm[star.eroded_mask].mean())
    err_star = np.abs(_lesion_core_means(p, star.chi_ppm) - truth).sum()
    err_tkd = np.abs(_lesion_core_means(p, tkd.chi_ppm) - truth).sum()
    assert err_star < err_tkd


def _args(shape=(4, 24, 24, 24)):
    rng = np.random.default_rng(0)
    mag = rng.random(shape).astype(np.float32) + 0.5
    ph = (rng.random(shape).astype(np.float32) - 0.5) * 6
    return mag, ph, [0.005, 0.01, 0.015, 0.02][: shape[0]], 3.0, Geometry.from_parameters(shape[1:], (1, 1, 1))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: (a[0], np.zeros_like(a[1])) + a[2:], "constant"),
        (lambda a: (a[0], np.where(np.arange(24) == 3, np.nan, a[1]).astype(np.float32)) + a[2:], "NaN"),
        (lambda a: (a[0], a[1][:, :, :, :-1]) + a[2:], "differ in shape"),
        (lambda a: (a[0][:3], a[1]) + a[2:], "differ in shape"),
        (lambda a: a[:2] + ([0.005, 0.01, 0.015],) + a[3:], "echo times"),
        (lambda a: a[:2] + ([0.01, 0.005, 0.015, 0.02],) + a[3:], "increasing"),
        (lambda a: a[:4] + (Geometry.from_parameters((24, 24, 25), (1, 1, 1)),), "geometry"),
        (lambda a: a[:3] + (0.0,) + a[4:], "field strength"),
    ],
    ids=["constant", "nan", "shape", "echoes", "te_count", "te_order", "geometry", "b0"],
)
def test_refusals(mutate, message):
    with pytest.raises(ReconstructionError, match=message):
        reconstruct(*mutate(_args()))


def test_refuses_volume_too_small_for_the_kernels():
    mag, ph, te, b0, _ = _args((4, 24, 24, 10))
    with pytest.raises(ReconstructionError, match="too small"):
        reconstruct(mag, ph, te, b0, Geometry.from_parameters((24, 24, 10), (1, 1, 1)))


def test_refuses_mask_that_does_not_fit():
    mag, ph, te, b0, geom = _args()
    with pytest.raises(ReconstructionError, match="mask"):
        reconstruct(mag, ph, te, b0, geom, mask=np.ones((24, 24, 23), bool))
    with pytest.raises(ReconstructionError, match="too small|empty"):
        tiny = np.zeros((24, 24, 24), bool)
        tiny[12, 12, 12] = True
        reconstruct(mag, ph, te, b0, geom, mask=tiny)


def test_single_echo_chain_accepts_3d_arrays():
    geom = Geometry.oblique(SHAPE, SPACING, 0.0)
    p = head_phantom(SHAPE, SPACING, echo_times_s=(0.02,), seed=4)
    # one echo: the phantom's smooth receiver phase offset stays in the field (documented limit);
    # V-SHARP removes most of it, lesions must still come out with the right sign
    r = reconstruct(p.magnitude[0], p.phase_rad[0], [0.02], 3.0, geom, method="tkd")
    em = r.eroded_mask
    truth = p.chi_brain_ppm - p.chi_brain_ppm[em].mean()
    got = _lesion_core_means(p, r.chi_ppm)
    want = _lesion_core_means(p, truth)
    assert np.all(np.sign(got) == np.sign(want))
    assert np.corrcoef(r.chi_ppm[em], truth[em])[0, 1] > 0.6  # 0.67 measured (0.81 former Laplacian chain)
