"""Phantom families (training.sim.family): the default family pinned, the randomised one's draws."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import physics
from core.errors import ConfigError
from training import simulate as sim_cli
from training.sim import family as fam
from training.sim import phantom, truth

COARSE = fam.RandomisedRanges(voxel_mm=(3.5, 4.5))

# simulate_subject("d", 5, voxel_mm=(4, 4, 4), n_cmb=3, n_calc=1), measured on the code before
# phantom families existed (commit 18c7f88): the default family must stay this subject.
PINNED_LESIONS = [
    {"kind": "cmb", "centre_lps_mm": [-22.444, -44.368, 45.776], "centre_voxel": [16.777, 15.396, 26.421],
     "diameter_mm": 3.452, "chi_ppm": 1.3971, "r2star_s": 490.74, "mars_region": "frontal",
     "mars_category": "lobar", "side": "right"},
    {"kind": "cmb", "centre_lps_mm": [18.038, -9.682, 8.641], "centre_voxel": [26.898, 24.068, 17.137],
     "diameter_mm": 3.715, "chi_ppm": 0.9419, "r2star_s": 481.07, "mars_region": "basal_ganglia",
     "mars_category": "deep", "side": "left"},
    {"kind": "cmb", "centre_lps_mm": [-17.032, 2.033, 10.564], "centre_voxel": [18.13, 26.996, 17.618],
     "diameter_mm": 5.468, "chi_ppm": 0.5563, "r2star_s": 403.71, "mars_region": "basal_ganglia",
     "mars_category": "deep", "side": "right"},
    {"kind": "calcification", "centre_lps_mm": [58.447, 14.048, -11.908], "centre_voxel": [37.0, 30.0, 12.0],
     "diameter_mm": 3.061, "chi_ppm": -0.4537, "r2star_s": 212.83, "mars_region": "temporal",
     "mars_category": "lobar", "side": "left"},
]
# (sum, sum of |x|, sum of x^2) over the arrays, float64
PINNED_SUMS = {
    "magnitude": (84988804.24053118, 84988804.24053118, 46606821750.14357),
    "phase_rad": (-17492.62825445842, 837700.73572308, 1794861.7278126066),
    "chi_ppm": (-478.5131490964724, 1138.4480605757396, 1027.8453938762618),
}


def _default(**kw):
    return phantom.simulate_subject("d", 5, voxel_mm=(4.0, 4.0, 4.0), n_cmb=3, n_calc=1, **kw)


def _randomised(seed: int = 5, **kw):
    kw.setdefault("n_cmb", 6)
    kw.setdefault("n_calc", 2)
    return phantom.simulate_subject("r", seed, family="randomised", family_ranges=COARSE, **kw)


@pytest.fixture(scope="module")
def rand_study():
    return _randomised(cmb_diameter_mm=(6.0, 9.0))


def test_default_family_unchanged():
    s = _default()
    assert [l.to_json() for l in s.lesions] == PINNED_LESIONS
    assert s.geometry.shape == (50, 58, 44) and int(s.brain_mask.sum()) == 26217
    assert s.acquisition.echo_times_s == [0.006, 0.012, 0.018, 0.024]
    assert s.acquisition.field_strength_t == 3.0 and s.acquisition.snr == 40.0
    for name, (total, absolute, squares) in PINNED_SUMS.items():
        a = getattr(s, name).astype(np.float64)
        # the signed sum of the phase cancels; an FFT library may move the last bits
        np.testing.assert_allclose(float(a.sum()), total, rtol=1e-5, atol=abs(absolute) * 1e-6)
        np.testing.assert_allclose(float(np.abs(a).sum()), absolute, rtol=1e-5)
        np.testing.assert_allclose(float((a ** 2).sum()), squares, rtol=1e-5)
    named = _default(family="default")
    for name in ("magnitude", "phase_rad", "chi_ppm", "brain_mask"):
        np.testing.assert_array_equal(getattr(s, name), getattr(named, name))
    t = truth.truth_dict(s)
    assert t["family"] == "default" and "family_params" not in t
    assert all("shape" not in l for l in t["lesions"])


def test_unknown_family_refused():
    with pytest.raises(ConfigError, match="unknown phantom family"):
        _default(family="random")


def test_randomised_same_seed_same_arrays():
    a, b, c = _randomised(5), _randomised(5), _randomised(6)
    for name in ("magnitude", "phase_rad", "chi_ppm", "brain_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert [l.to_json() for l in a.lesions] == [l.to_json() for l in b.lesions]
    assert a.family_params == b.family_params != c.family_params
    assert not np.array_equal(a.chi_ppm, c.chi_ppm)


def test_draws_fall_in_the_stated_ranges():
    r = fam.RandomisedRanges()
    draws = [fam.draw_subject_params(seed, r) for seed in range(300)]
    assert {p.field_strength_t for p in draws} == {1.5, 3.0, 7.0}
    n_echoes = {len(p.echo_times_s) for p in draws}
    assert n_echoes == {2, 3, 4, 5, 6}
    spacings = set()
    for p in draws:
        assert 15.0 <= p.snr <= 60.0
        te = np.asarray(p.echo_times_s)
        assert 0.0025 <= te[0] <= 0.008 + 1e-9 and te[-1] <= 0.040 + 1e-6
        gaps = np.diff(te)
        assert gaps.min() >= 0.002 - 1e-6
        spacings.add(round(float(gaps.max() - gaps.min()), 4))
        drawn = np.asarray(p.voxel_drawn_mm)
        assert np.all((0.5 <= drawn) & (drawn <= 1.5))
        assert np.prod(p.shape) <= r.max_matrix_voxels
        if p.voxel_capped:
            assert np.all(np.asarray(p.voxel_mm) >= drawn - 1e-4)
        else:
            np.testing.assert_allclose(p.voxel_mm, drawn, atol=1e-4)
        assert -0.05 <= p.chi_wm <= -0.01 and 0.0 <= p.chi_gm <= 0.04 and -0.01 <= p.chi_csf <= 0.01
        for k, (lo, hi) in r.chi_deep.items():
            assert lo <= p.chi_deep[k] <= hi
        assert 0.36 <= p.haematocrit <= 0.46 and 0.55 <= p.venous_saturation <= 0.72
    assert max(spacings) > 0.002  # unequal echo spacing occurs
    assert any(p.voxel_mm[0] != p.voxel_mm[2] for p in draws)  # anisotropic voxels occur
    assert min(p.voxel_mm[0] for p in draws) < 0.6 and max(p.voxel_mm[2] for p in draws) > 1.4
    rng = np.random.default_rng(0)
    veins = [fam.vein_chi(rng, p, r.venous_saturation_per_vein) for p in draws]
    lo = 0.36 * fam.DCHI_DEOXY_PPM * (1 - 0.72 - 0.05)
    hi = 0.46 * fam.DCHI_DEOXY_PPM * (1 - 0.55 + 0.05)
    assert lo - 1e-9 <= min(veins) and max(veins) <= hi + 1e-9
    assert 0.28 < lo and hi < 0.79  # the range the module docstring states


def test_shapes_keep_the_sphere_volume_and_centroid():
    rng = np.random.default_rng(3)
    kinds = set()
    for _ in range(60):
        d = float(rng.uniform(2.0, 10.0))
        s = fam.draw_shape(rng, d)
        kinds.add(s.kind)
        vol, cen = fam._volume_and_centroid(s, s.bounding_radius_mm() * 1.05, n=64)
        np.testing.assert_allclose(vol, np.pi / 6 * d ** 3, rtol=0.06)
        assert np.linalg.norm(cen) < 0.06 * d
        if s.kind != "sphere":
            assert max(s.semi_axes_mm) / min(s.semi_axes_mm) > 1.0 + 1e-6 or s.lobe_radii_mm
    assert kinds == set(fam.SHAPE_KINDS)


def test_shape_fraction_volume_on_an_anisotropic_grid():
    from core.geometry import Geometry

    g = Geometry.oblique((60, 60, 40), (0.5, 0.5, 0.8), 10.0, (0.0, 0.0, 0.0))
    rng = np.random.default_rng(11)
    for _ in range(5):
        s = fam.draw_shape(rng, 8.0, (0.0, 0.5, 0.5))
        sl, f = fam.shape_fraction(g, np.zeros(3), s)
        np.testing.assert_allclose(f.sum() * g.voxel_volume_mm3, np.pi / 6 * 8.0 ** 3, rtol=0.08)
        assert 0.0 <= f.min() and f.max() == 1.0


def test_randomised_subject_lesions_and_physics(rand_study):
    s = rand_study
    p = s.family_params
    acq = s.acquisition
    assert s.family == "randomised"
    assert acq.echo_times_s == p["echo_times_s"] and acq.field_strength_t == p["field_strength_t"]
    np.testing.assert_allclose(s.geometry.spacing, p["voxel_mm"], atol=1e-6)
    assert s.magnitude.shape == (len(acq.echo_times_s),) + tuple(p["shape"])
    b0 = acq.field_strength_t
    cmbs = [l for l in s.lesions if l.kind == "cmb"]
    calcs = [l for l in s.lesions if l.kind == "calcification"]
    assert len(cmbs) == 6
    for l in cmbs:
        assert 0.1 <= l.chi_ppm <= 2.5 and 150.0 * b0 / 3 <= l.r2star_s <= 1200.0 * b0 / 3
        assert l.shape is not None and 6.0 <= l.diameter_mm <= 9.0
        v = tuple(int(round(c)) for c in l.centre_voxel)
        assert s.chi_ppm[v] > 0.05  # the centroid voxel holds (part of) the lesion
    for l in calcs:
        assert -2.0 <= l.chi_ppm <= -0.1 and 50.0 <= l.r2star_s <= 400.0
    assert {l.shape["kind"] for l in s.lesions} != {"sphere"}  # not all spheres
    t = truth.truth_dict(s)
    assert t["family"] == "randomised" and t["family_params"] == p
    assert all("shape" in l for l in t["lesions"])
    json.dumps(t)
    # phase = 2 pi gamma_bar B0 field TE: the echo difference follows the field at this B0 and TE
    te = acq.echo_times_s
    field = s.extra_truth["field_ppm"]
    strong = s.brain_mask & (s.magnitude[1] > 0.5 * np.median(s.magnitude[1][s.brain_mask]))
    measured = physics.wrap(s.phase_rad[1] - s.phase_rad[0])[strong]
    expected = physics.wrap(physics.field_to_phase(field, te[1] - te[0], b0))[strong]
    assert np.median(np.abs(physics.wrap(measured - expected))) < 0.1
    # magnitude decays with R2*: brain signal falls from the first to the last echo
    assert s.magnitude[-1][s.brain_mask].mean() < s.magnitude[0][s.brain_mask].mean()


def test_cli_records_the_family(tmp_path):
    with pytest.raises(SystemExit) as exc:
        sim_cli.main(["--out", str(tmp_path / "x"), "--family", "randomised", "--snr", "30"])
    assert exc.value.code == 2
    out = tmp_path / "c"
    assert sim_cli.main(["--out", str(out), "--family", "randomised", "--voxel-range-mm", "3.5", "4.5",
                         "--seed", "3"]) == 0
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["family"] == "randomised"
    rec = cohort["subjects"][0]
    t = json.loads((out / "sub-000" / "truth" / "truth.json").read_text())
    assert t["family"] == "randomised" and rec["family"] == "randomised"
    assert rec["echo_times_s"] == t["family_params"]["echo_times_s"] == t["acquisition"]["echo_times_s"]
    assert rec["echoes"] == len(rec["echo_times_s"])
    assert all(3.5 * 0.999 <= v <= 4.5 * 1.001 for v in rec["voxel_mm"])
