"""Training data builder (training.dataset): the DESIGN.md section 7 hit rule (radius rule, one to
one), candidate labelling, the lesion mask on the patch grid, and one shard built end to end
from a tiny simulated subject (2 mm, cropped field of view)."""

import json

import numpy as np
import pytest

from core.detect.stage1 import FEATURE_NAMES, Stage1Params
from training.dataset import (
    LABELS,
    PATCH_SIZE,
    build_subject,
    hit_distance_mm,
    label_candidates,
    lesion_mask_patch,
    match_hits,
    write_shard,
)
from training.sim.study import Lesion


def _lesion(kind, centre, diameter):
    return Lesion(kind=kind, centre_lps_mm=tuple(centre), centre_voxel=tuple(centre), diameter_mm=diameter,
                  chi_ppm=0.5 if kind == "cmb" else -0.5, r2star_s=300.0, mars_region="frontal",
                  mars_category="lobar", side="left")


def test_hit_distance_rule():
    assert hit_distance_mm(1.0) == 3.0  # small lesions: 3 mm floor
    assert hit_distance_mm(1.5) == 3.0
    assert hit_distance_mm(4.0) == 5.5  # large: radius + 1.5 mm


def test_match_radius_rule():
    les = [(0.0, 0.0, 0.0)]
    assert match_hits([[2.9, 0, 0]], les, [1.0]) == [(0, 0)]
    assert match_hits([[3.1, 0, 0]], les, [1.0]) == []
    assert match_hits([[5.4, 0, 0]], les, [4.0]) == [(0, 0)]
    assert match_hits([[5.6, 0, 0]], les, [4.0]) == []
    assert match_hits(np.zeros((0, 3)), les, [1.0]) == []


def test_match_one_to_one_maximal():
    # two candidates near one lesion -> one hit, the nearer candidate
    assert match_hits([[2.0, 0, 0], [1.0, 0, 0]], [(0, 0, 0)], [1.0]) == [(1, 0)]
    # candidate 0 reaches both lesions, candidate 1 only lesion 0: both lesions must be hit
    pairs = match_hits([[2.0, 0, 0], [-2.0, 0, 0]], [(0, 0, 0), (4.0, 0, 0)], [1.0, 1.0])
    assert pairs == [(0, 1), (1, 0)]
    # one candidate between two lesions hits only one
    assert len(match_hits([[2.0, 0, 0]], [(0, 0, 0), (4.0, 0, 0)], [1.0, 1.0])) == 1


def test_label_candidates():
    lesions = [_lesion("cmb", (0, 0, 0), 4.0), _lesion("calcification", (30, 0, 0), 4.0)]
    cand = np.array([[1, 0, 0], [0, 2, 0], [30, 1, 0], [29, 0, 0], [60, 0, 0], [90, 0, 0], [1, 1, 0]], float)
    dia = np.array([False, False, True, False, False, False, True])
    vein = np.array([False, False, False, False, True, False, False])
    labels, index = label_candidates(cand, dia, lesions, vein)
    assert labels == ["cmb", "cmb_duplicate", "calcification", "calcification", "vessel", "other", "other"]
    assert list(index) == [0, 0, 1, 1, -1, -1, -1]
    # a diamagnetic candidate on a microbleed never becomes one
    labels, _ = label_candidates(cand[[6]], dia[[6]], lesions, None)
    assert labels == ["other"]


def test_lesion_mask_patch():
    m = lesion_mask_patch(np.array([10, 10, 10]), (1.0, 1.0, 1.0), (12.0, 10.0, 10.0), 5.0)
    assert m.shape == (PATCH_SIZE,) * 3 and m.dtype == np.uint8
    assert m[18, 16, 16] == 1 and m[16, 16, 16] == 1  # lesion centre at patch index 16 + 2
    assert m[18, 16, 19] == 0  # 3 mm from the centre of a 2.5 mm radius sphere
    assert 40 <= m.sum() <= 90  # 4/3 pi 2.5^3 = 65 mm^3
    tiny = lesion_mask_patch(np.array([0, 0, 0]), (2.0, 2.0, 2.0), (0.2, 0.0, 0.0), 1.0)
    assert tiny.sum() >= 1 and tiny[16, 16, 16] == 1


@pytest.fixture(scope="module")
def shard():
    return build_subject("tiny", 5, voxel_mm=(2.0, 2.0, 2.0), shape=(64, 72, 48), n_cmb=3, n_calc=1,
                         insert_per_subject=1, qsm_method="tkd", params=Stage1Params(threshold=0.05))


def test_shard_shapes_and_labels(shard, tmp_path):
    a, meta = shard["arrays"], shard["meta"]
    n = len(a["labels"])
    assert n > 0
    assert a["patches"].shape == (n, PATCH_SIZE, PATCH_SIZE, PATCH_SIZE) and a["patches"].dtype == np.float16
    assert a["masks"].shape == a["patches"].shape and a["masks"].dtype == np.uint8
    assert a["cubes"].shape == (n, 7, 7, 7)
    assert a["features"].shape == (n, len(FEATURE_NAMES))
    assert set(a["labels"]) <= set(LABELS)
    assert np.array_equal(a["label_codes"], [LABELS.index(x) for x in a["labels"]])
    pos = np.isin(a["labels"], ["cmb", "cmb_duplicate"])
    assert np.all(a["masks"][pos].reshape(pos.sum(), -1).sum(axis=1) > 0)
    assert np.all(a["masks"][~pos] == 0)
    assert not np.any(a["diamagnetic"] & (a["labels"] == "cmb"))
    st = meta["stage1"]
    cmb = [le for le in meta["lesions"] if le["kind"] == "cmb"]
    assert st["cmb_total"] == len(cmb) == 4 and meta["inserted_cmb"] == 1
    assert st["tp"] == int((a["labels"] == "cmb").sum()) and st["tp"] + st["fn"] == st["cmb_total"]
    assert st["fp"] == int((~a["diamagnetic"]).sum()) - st["tp"]
    assert len(st["missed"]) == st["fn"]
    assert all(m["frst_max_nearby"] >= 0.0 and m["kind"] == "cmb" for m in st["missed"])
    # patch centre is the QSM at the candidate voxel: features[peak] >= patch centre value
    peak = a["features"][:, FEATURE_NAMES.index("peak_chi_ppm")]
    para = ~a["diamagnetic"]
    centre = a["patches"][:, 16, 16, 16].astype(np.float32)
    assert np.all(peak[para] >= centre[para] - 1e-2)
    path = write_shard(shard, str(tmp_path))
    z = np.load(path)
    assert np.array_equal(z["labels"], a["labels"])
    assert json.load(open(tmp_path / "tiny.json"))["stage1"]["tp"] == st["tp"]


def test_deterministic(shard):
    again = build_subject("tiny", 5, voxel_mm=(2.0, 2.0, 2.0), shape=(64, 72, 48), n_cmb=3, n_calc=1,
                          insert_per_subject=1, qsm_method="tkd", params=Stage1Params(threshold=0.05))
    assert np.array_equal(again["arrays"]["patches"], shard["arrays"]["patches"])
    assert list(again["arrays"]["labels"]) == list(shard["arrays"]["labels"])


def test_randomised_family_shard():
    """--family randomised: the family's draws are the acquisition, recorded in the shard json."""
    res = build_subject("rand", 5, family="randomised", voxel_range_mm=(3.5, 4.5), n_cmb=3, n_calc=0,
                        qsm_method="tkd", params=Stage1Params(threshold=0.05))
    meta = res["meta"]
    p = meta["family_params"]
    assert meta["family"] == "randomised"
    assert meta["echo_times_s"] == p["echo_times_s"] and meta["field_strength_t"] == p["field_strength_t"]
    np.testing.assert_allclose(meta["voxel_mm"], p["voxel_mm"], atol=1e-6)
    assert all(3.5 * 0.999 <= v <= 4.5 * 1.001 for v in meta["voxel_mm"])
    assert all("shape" in le for le in meta["lesions"])
    json.dumps(meta)
