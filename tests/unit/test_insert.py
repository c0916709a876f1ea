"""Physics-based microbleed insertion (training.sim.insert): the added phase has the dipole
pattern of a paramagnetic sphere (positive along B0 at the poles, negative at the equator), the
magnitude drops inside the lesion, the truth is updated, and our QSM chain reconstructs the
inserted lesion positive at its centre."""

import numpy as np
import pytest

from core.physics import wrap
from core.qsm.pipeline import reconstruct
from training.sim.insert import insert_microbleeds
from training.sim.phantom import simulate_subject


@pytest.fixture(scope="module")
def pair():
    st = simulate_subject("ins", 11, voxel_mm=(2.0, 2.0, 2.0), shape=(64, 72, 48), n_cmb=0, n_calc=0)
    rng = np.random.default_rng(3)
    centre = st.geometry.voxel_to_patient(np.array([34.0, 36.0, 26.0]))
    assert st.brain_mask[34, 36, 26]
    new = insert_microbleeds(st, 1, rng, diameter_mm=(6.0, 6.0), chi_ppm=(1.0, 1.0), centres_lps=centre[None])
    return st, new


def test_truth_updated(pair):
    st, new = pair
    assert len(st.lesions) == 0 and len(new.lesions) == 1
    le = new.lesions[0]
    assert le.kind == "cmb" and le.diameter_mm == 6.0 and le.chi_ppm == 1.0
    assert np.allclose(le.centre_voxel, (34.0, 36.0, 26.0), atol=1e-6)
    assert le.mars_region != "" and le.side in ("left", "right", "midline")
    assert new.chi_ppm[34, 36, 26] == pytest.approx(1.0, abs=1e-5)
    assert np.array_equal(new.chi_ppm[:, :, :10], st.chi_ppm[:, :, :10])  # far away: unchanged
    assert st.chi_ppm[34, 36, 26] != pytest.approx(1.0)  # the input study was not modified


def test_phase_change_has_dipole_pattern(pair):
    st, new = pair
    e = len(st.acquisition.echo_times_s) - 1
    d = wrap(new.phase_rad[e] - st.phase_rad[e])
    b0 = st.geometry.b0_direction_ijk()
    assert abs(b0[2]) > 0.99  # axial slab: B0 along k
    c = np.array([34, 36, 26])
    pole = [d[tuple(c + s * np.array([0, 0, 3]))] for s in (1, -1)]  # 6 mm along B0 (radius 3 mm)
    equator = [d[tuple(c + s * np.array(v))] for s in (1, -1) for v in ((3, 0, 0), (0, 3, 0))]
    assert min(pole) > 0.3
    assert max(equator) < -0.1
    assert abs(np.median(pole)) > 1.5 * abs(np.median(equator))  # 2 chi/3 (a/r)^3 vs chi/3 (a/r)^3
    # far from the lesion the phase is untouched up to the small dipole tail and added noise
    assert np.median(np.abs(d[:, :, :8][st.brain_mask[:, :, :8]])) < 0.02


def test_magnitude_drops_and_qsm_positive(pair):
    st, new = pair
    c = (34, 36, 26)
    assert new.magnitude[-1][c] < 0.3 * st.magnitude[-1][c]
    q_new = reconstruct(new.magnitude, new.phase_rad, new.acquisition.echo_times_s, 3.0, new.geometry,
                        method="tkd")
    assert q_new.mask[c]
    assert q_new.chi_ppm[c] > 0.3
    # the lesion stands out of the surrounding tissue (truth there is within +-0.2 ppm)
    ring = [q_new.chi_ppm[34 + di, 36 + dj, 26] for di, dj in ((5, 0), (-5, 0), (0, 5), (0, -5))]
    assert q_new.chi_ppm[c] - float(np.median(ring)) > 0.3
    assert np.all(np.abs(st.chi_ppm[[39, 29, 34, 34], [36, 36, 41, 31], 26]) < 0.2)


def test_deep_gm_fraction_places_bleeds_in_deep_grey_nuclei():
    st = simulate_subject("insdeep", 12, voxel_mm=(2.0, 2.0, 2.0), shape=(80, 96, 72), n_cmb=0, n_calc=0)
    deep = np.asarray(st.extra_truth["deep_gm_labels"]) > 0
    assert deep.any()

    def share_in_deep(fraction):
        new = insert_microbleeds(st, 6, np.random.default_rng(5), diameter_mm=(2.0, 3.0), deep_gm_fraction=fraction)
        vox = [tuple(int(round(c)) for c in le.centre_voxel) for le in new.lesions]
        assert len(vox) >= 4
        return np.mean([deep[v] for v in vox])

    assert share_in_deep(1.0) == 1.0
    assert share_in_deep(0.0) < 0.5  # drawn over the whole brain: the nuclei are a small share
