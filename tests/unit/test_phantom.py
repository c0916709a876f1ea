"""The simulator's digital head and acquisition (coarse grids to stay fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import mars, physics
from training import cohort_stats
from training.sim import phantom, truth

CATS = ["lobar", "deep", "infratentorial", "lobar", "deep", "lobar"]


@pytest.fixture(scope="module")
def study():
    """2 mm subject with six microbleeds of known categories, large enough to see at 2 mm."""
    return phantom.simulate_subject(
        "t1", 11, voxel_mm=(2.0, 2.0, 2.0), n_cmb=6, n_calc=2, cmb_categories=CATS,
        cmb_diameter_mm=(6.0, 8.0), cmb_chi_ppm=(0.8, 1.2),
    )


def _small(seed: int):
    return phantom.simulate_subject("d", seed, voxel_mm=(4.0, 4.0, 4.0), n_cmb=3, n_calc=1)


def test_deterministic_per_seed():
    a, b, c = _small(5), _small(5), _small(6)
    for name in ("magnitude", "phase_rad", "chi_ppm", "brain_mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert [l.to_json() for l in a.lesions] == [l.to_json() for l in b.lesions]
    assert not np.array_equal(a.magnitude, c.magnitude)
    assert not np.array_equal(a.chi_ppm, c.chi_ppm)


def test_shapes_and_default_geometry(study):
    g = study.geometry
    assert g.shape == phantom.default_shape((2.0, 2.0, 2.0)) == (100, 116, 88)
    assert study.magnitude.shape == (4,) + g.shape == study.phase_rad.shape
    assert study.magnitude.dtype == np.float32 and study.phase_rad.dtype == np.float32
    assert study.phase_rad.min() >= -np.pi and study.phase_rad.max() < np.pi
    # a brain of plausible size: 1.1-2.6 litres
    assert 1.1e6 < study.brain_mask.sum() * g.voxel_volume_mm3 < 2.6e6


def test_cmbs_in_requested_category_and_paramagnetic(study):
    cmbs = [l for l in study.lesions if l.kind == "cmb"]
    assert [l.mars_category for l in cmbs] == CATS
    for l in cmbs:
        assert mars.category_of(l.mars_region) == l.mars_category
        assert 6.0 <= l.diameter_mm <= 8.0 and 0.8 <= l.chi_ppm <= 1.2
        assert l.side in ("left", "right", "midline")
        v = tuple(int(round(c)) for c in l.centre_voxel)
        assert study.chi_ppm[v] > 0.5  # the centre voxel is (mostly) the lesion
        assert study.extra_truth["mars_region"][v] == mars.REGION_BY_KEY[l.mars_region].index
        # patient coordinates and voxel agree
        np.testing.assert_allclose(study.geometry.voxel_to_patient(l.centre_voxel), l.centre_lps_mm, atol=1e-2)


def test_calcifications_diamagnetic_and_all_lesions_in_brain(study):
    calcs = [l for l in study.lesions if l.kind == "calcification"]
    assert len(calcs) == 2
    for l in calcs:
        v = tuple(int(round(c)) for c in l.centre_voxel)
        assert l.chi_ppm < -0.25
        assert study.chi_ppm[v] < -0.1
    for l in study.lesions:
        v = tuple(int(round(c)) for c in l.centre_voxel)
        assert study.brain_mask[v], l.to_json()


def test_deep_grey_iron_order(study):
    chi, lab = study.chi_ppm, study.extra_truth["deep_gm_labels"]
    codes = study.extra_truth["deep_gm_codes"]
    med = {k: float(np.median(chi[lab == c])) for k, c in codes.items() if (lab == c).any()}
    assert med["pallidum"] > med["putamen"] > med["thalamus"]
    wm_like = chi[study.brain_mask & (lab == 0) & (chi < 0)]
    assert np.median(wm_like) < 0.0


def test_cmb_phase_polarity(study):
    """Along B0 the field just outside a paramagnetic sphere is positive, at its equator negative
    (the product polarity of DESIGN.md section 4); calcifications show the reverse."""
    g = study.geometry
    b0 = g.b0_direction_ijk()
    assert np.allclose(b0, [0, 0, 1])
    ph = study.phase_rad[0]  # first echo: small local phase differences do not wrap
    checked = 0
    for l in study.lesions:
        c = np.rint(l.centre_voxel).astype(int)
        d = int(np.ceil(0.75 * l.diameter_mm / g.spacing[0]))  # 1.5 radii away
        poles = [c + [0, 0, d], c - [0, 0, d]]
        equator = [c + [d, 0, 0], c - [d, 0, 0], c + [0, d, 0], c - [0, d, 0]]
        # phase difference of the averaged signals (the lesion centre itself is dark and noisy)
        pole = np.sum([np.exp(1j * ph[tuple(p)]) for p in poles])
        eq = np.sum([np.exp(1j * ph[tuple(p)]) for p in equator])
        diff = float(np.angle(pole * np.conj(eq)))
        if l.kind == "cmb":
            assert diff > 0.2, (diff, l.to_json())
            checked += 1
        elif l.diameter_mm >= 4.0:  # resolved diamagnetic calcification: the opposite pattern
            assert diff < -0.1, (diff, l.to_json())
            checked += 1
    assert checked == 8  # this seed's two calcifications are 5.4 and 6.9 mm


def test_cmb_blooming_at_last_echo(study):
    """The dark region around a microbleed at the last echo is larger than the microbleed."""
    g = study.geometry
    mag = study.magnitude[-1]
    brain_med = float(np.median(mag[study.brain_mask]))
    for l in study.lesions:
        if l.kind != "cmb":
            continue
        c = np.rint(l.centre_voxel).astype(int)
        r = 8
        box = tuple(slice(max(x - r, 0), x + r + 1) for x in c)
        dark = mag[box] < 0.4 * brain_med
        lesion_vox = (np.pi / 6 * l.diameter_mm**3) / g.voxel_volume_mm3
        assert mag[tuple(c)] < 0.25 * brain_med
        # the connected dark blob containing the centre
        from scipy import ndimage

        lab, _ = ndimage.label(dark)
        centre_in_box = tuple(int(x - s.start) for x, s in zip(c, box))
        blob = (lab == lab[centre_in_box]).sum()
        assert blob > 1.3 * lesion_vox, (blob, lesion_vox)


def test_background_field_wraps(study):
    te = study.acquisition.echo_times_s[-1]
    field = study.extra_truth["field_ppm"][study.brain_mask]
    span = physics.field_to_phase(np.percentile(field, 99) - np.percentile(field, 1), te, 3.0)
    assert span > 2 * np.pi
    # and the wrapped phase really jumps inside the brain
    ph = study.phase_rad[-1]
    jumps = np.abs(np.diff(ph, axis=0)) > np.pi
    assert (jumps & study.brain_mask[1:] & study.brain_mask[:-1]).sum() > 50


def test_air_outside_head_is_noise_and_veins_paramagnetic(study):
    mag0 = study.magnitude[0]
    corner = mag0[:8, :8, -8:]
    assert np.median(corner) < 0.1 * np.median(mag0[study.brain_mask])
    veins = study.extra_truth["vein_mask"] & study.brain_mask
    assert veins.sum() > 20
    assert np.median(study.chi_ppm[veins]) > 0.2


def test_control_has_no_cmbs():
    s = phantom.simulate_subject("c", 3, voxel_mm=(4.0, 4.0, 4.0), control=True, n_calc=2)
    assert s.is_control
    assert not [l for l in s.lesions if l.kind == "cmb"]
    assert len([l for l in s.lesions if l.kind == "calcification"]) == 2


def test_transform_round_trip():
    rng = np.random.default_rng(0)
    xf = phantom.SubjectTransform.random(rng)
    lps = rng.uniform(-80, 80, size=(3, 50))
    back = xf.from_mni(xf.to_mni(lps))
    np.testing.assert_allclose(back, lps, atol=1e-3)
    assert 0.92 <= xf.scale <= 1.08


def test_write_truth_and_cohort_stats(study, tmp_path):
    import nibabel as nib

    out = tmp_path / "t1"
    truth.write_truth(study, str(out))
    img = nib.load(str(out / "chi.nii.gz"))
    np.testing.assert_allclose(img.affine, study.geometry.nifti_affine(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(img.dataobj), study.chi_ppm, atol=1e-6)
    assert np.asarray(nib.load(str(out / "brain_mask.nii.gz")).dataobj).sum() == study.brain_mask.sum()
    t = json.loads((out / "truth.json").read_text())
    assert t["subject_id"] == "t1" and t["seed"] == 11 and t["simulated"] is True
    assert t["counts"]["cmb"] == 6 and t["counts"]["calcification"] == 2
    assert t["geometry"]["shape"] == [100, 116, 88]
    stats = cohort_stats.cohort_stats(cohort_stats.find_truth_files([str(tmp_path)]))
    assert stats["subjects"] == 1 and stats["cmb_total"] == 6
    assert stats["cmb_by_category"] == {"lobar": 3, "deep": 2, "infratentorial": 1}
    assert sum(stats["cmb_by_size"].values()) == 6 and stats["cmb_by_size"]["5-10mm"] == 6
    assert cohort_stats.main([str(tmp_path)]) == 0


def test_tilted_slab_sees_the_same_head():
    """An angulated slab changes the grid and the B0 direction in it, not the anatomy."""
    flat = phantom.simulate_subject("a", 21, voxel_mm=(4.0, 4.0, 4.0), n_cmb=2, n_calc=0)
    tilt = phantom.simulate_subject("a", 21, voxel_mm=(4.0, 4.0, 4.0), n_cmb=2, n_calc=0, tilt_deg=15.0)
    b0 = tilt.geometry.b0_direction_ijk()
    assert abs(b0[2] - np.cos(np.deg2rad(15.0))) < 1e-6 and abs(b0[1]) > 0.2
    v_flat, v_tilt = flat.brain_mask.sum(), tilt.brain_mask.sum()
    assert abs(v_flat - v_tilt) / v_flat < 0.05
    # same seed, same subject: the deep grey nuclei keep their volume
    deep_flat = (flat.extra_truth["deep_gm_labels"] > 0).sum()
    deep_tilt = (tilt.extra_truth["deep_gm_labels"] > 0).sum()
    assert abs(deep_flat - deep_tilt) / deep_flat < 0.1


def test_single_echo_anisotropic_and_bad_input():
    from core.errors import ConfigError

    s = phantom.simulate_subject("x", 5, voxel_mm=(3.0, 3.0, 4.0), echo_times_s=[phantom.SINGLE_ECHO_TIME_S],
                                 field_strength_t=1.5, n_cmb=2, n_calc=0)
    assert s.magnitude.shape == (1,) + s.geometry.shape
    assert s.geometry.spacing == (3.0, 3.0, 4.0)
    assert s.acquisition.echo_times_s == [0.023] and s.acquisition.field_strength_t == 1.5
    assert len([l for l in s.lesions if l.kind == "cmb"]) == 2
    with pytest.raises(ConfigError):
        phantom.simulate_subject("x", 5, echo_times_s=[23.0])  # milliseconds by mistake
    with pytest.raises(ConfigError):
        phantom.simulate_subject("x", 5, voxel_mm=(1.0, 0.0, 1.0))
