"""Hit rule, one-to-one matching, counts and FROC on hand-computed examples."""

import numpy as np
import pytest

from core.findings import Finding
from training.metrics import (
    Counts,
    cohort_counts,
    evaluate_subject,
    froc,
    froc_points,
    hit_radius_mm,
    match,
    sensitivity_at_fp,
    sensitivity_by,
    controls_summary,
    calcification_summary,
    summarise,
)


def ref(x, y=0.0, z=0.0, d=3.0, kind="cmb", region="frontal", cat="lobar"):
    return {"kind": kind, "centre_lps_mm": [x, y, z], "diameter_mm": d, "mars_region": region, "mars_category": cat}


def det(x, y=0.0, z=0.0, p=0.9, kind="cmb"):
    return {"centre_lps_mm": [x, y, z], "probability": p, "kind": kind}


def test_hit_radius():
    assert hit_radius_mm(2.0) == 3.0
    assert hit_radius_mm(3.0) == 3.0  # 1.5 + 1.5
    assert hit_radius_mm(8.0) == 5.5


def test_exactly_three_mm_is_a_hit_and_just_beyond_is_not():
    assert match([det(3.0)], [ref(0.0, d=2.0)]).n_tp == 1
    m = match([det(3.01)], [ref(0.0, d=2.0)])
    assert (m.n_tp, m.n_fp, m.n_fn) == (0, 1, 1)
    # diagonal distance exactly 3: (1.8, 2.4, 0)
    assert match([det(1.8, 2.4)], [ref(0.0, d=4.0)]).n_tp == 1


def test_large_lesion_uses_radius_plus_margin():
    big = ref(0.0, d=8.0)  # hit radius 5.5
    assert match([det(0.0, 5.5)], [big]).n_tp == 1
    assert match([det(0.0, 5.6)], [big]).n_tp == 0
    assert match([det(0.0, 5.6)], [ref(0.0, d=8.4)]).n_tp == 1  # 4.2 + 1.5 = 5.7


def test_one_detection_near_two_lesions_is_one_tp_one_fn():
    m = match([det(2.0)], [ref(0.0), ref(4.0)])
    assert (m.n_tp, m.n_fp, m.n_fn) == (1, 0, 1)


def test_two_detections_near_one_lesion_is_one_tp_one_fp_higher_probability_wins():
    m = match([det(1.0, p=0.4), det(2.0, p=0.95)], [ref(0.0)])
    assert (m.n_tp, m.n_fp, m.n_fn) == (1, 1, 0)
    assert m.tp[0][0] == 1 and m.fp == [0]
    assert m.tp[0][2] == pytest.approx(2.0)


def test_assignment_is_optimal_not_greedy():
    # det A (closest to lesion 0) can also hit lesion 1; det B only lesion 0.
    # Nearest-first greedy gives A->0 and leaves B unmatched; optimal gives 2 hits.
    refs = [ref(0.0), ref(5.0)]
    dets = [det(0.5, p=0.9), det(-2.5, p=0.5)]  # A: 0.5 from L0, 4.5 from L1 (d=6 -> r 4.5)
    refs[1]["diameter_mm"] = 6.0
    m = match(dets, refs)
    assert (m.n_tp, m.n_fp, m.n_fn) == (2, 0, 0)
    assert sorted((i, j) for i, j, _ in m.tp) == [(0, 1), (1, 0)]


def test_findings_are_accepted_as_detections():
    f = Finding(1, "cmb", (10.0, 0.0, 0.0), (0.0, 0.0, 0.0), 3.0, 14.0, 0.5, 0.7)
    assert match([f], [ref(12.0)]).n_tp == 1


def test_counts_rates():
    c = Counts(tp=6, fn=2, fp=3, n_subjects=3)
    assert c.sensitivity == 0.75
    assert c.ppv == pytest.approx(6 / 9)
    assert c.fp_per_subject == 1.0
    assert c.f1 == pytest.approx(12 / 17)
    assert Counts().sensitivity is None


def test_mimic_kinds_are_not_scored_as_microbleeds():
    r = evaluate_subject("s", [det(0.0, kind="calcification")], [ref(0.0)])
    assert (r.match.n_tp, r.match.n_fp, r.match.n_fn) == (0, 0, 1)


def test_calcification_reported_as_cmb():
    refs = [ref(0.0), ref(20.0, kind="calcification"), ref(40.0, kind="calcification")]
    dets = [det(0.5), det(21.0), det(60.0)]
    r = evaluate_subject("s", dets, refs)
    assert (r.match.n_tp, r.match.n_fp, r.match.n_fn) == (1, 2, 0)
    assert calcification_summary([r]) == {"n_calcifications": 2, "reported_as_cmb": 1, "fraction_reported_as_cmb": 0.5}


def test_per_size_and_region_sensitivity():
    refs = [
        ref(0.0, d=3.0, region="frontal", cat="lobar"),
        ref(20.0, d=4.0, region="thalamus", cat="deep"),
        ref(40.0, d=6.0, region="thalamus", cat="deep"),
        ref(60.0, d=7.0, region="cerebellum", cat="infratentorial"),
        ref(80.0, d=1.5, region="frontal", cat="lobar"),
    ]
    dets = [det(0.0), det(40.0), det(60.0)]
    r = [evaluate_subject("s", dets, refs)]
    size = sensitivity_by(r, "size_class")
    assert size["2-5mm"] == {"n": 3, "tp": 1, "sensitivity": pytest.approx(1 / 3, abs=1e-6)}
    assert size["5-10mm"] == {"n": 2, "tp": 2, "sensitivity": 1.0}
    reg = sensitivity_by(r, "mars_region")
    assert reg["frontal"]["sensitivity"] == 0.5
    assert reg["thalamus"]["sensitivity"] == 0.5
    assert reg["cerebellum"]["sensitivity"] == 1.0
    assert sensitivity_by(r, "mars_category")["deep"]["tp"] == 1


def test_controls_metric():
    rs = [
        evaluate_subject("c1", [], [], control=True),
        evaluate_subject("c2", [det(0.0), det(30.0)], [], control=True),
        evaluate_subject("c3", [det(0.0, p=0.2)], [], control=True, threshold=0.5),
        evaluate_subject("p1", [det(0.0)], [], control=False),
    ]
    assert controls_summary(rs) == {
        "n_controls": 3, "n_without_fp": 2, "fraction_without_fp": pytest.approx(2 / 3, abs=1e-6),
        "fp_per_control": pytest.approx(2 / 3, abs=1e-6),
    }


def test_froc_hand_computed():
    # subject A: 2 lesions; dets p=.9 hit L0, p=.8 FP, p=.6 hit L1, p=.3 FP
    a = evaluate_subject(
        "A",
        [det(0.0, p=0.9), det(100.0, p=0.8), det(31.0, p=0.6), det(200.0, p=0.3)],
        [ref(0.0), ref(30.0)],
    )
    # subject B: 1 lesion; dets p=.7 FP, p=.5 hit, p=.6 duplicate on the same lesion
    b = evaluate_subject("B", [det(50.0, p=0.7), det(0.0, p=0.5), det(1.0, p=0.6)], [ref(0.0)])
    f = froc([a, b])
    assert f.thresholds.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5, 0.3]
    # kept at t: .9 -> TP1 FP0; .8 -> TP1 FP1; .7 -> TP1 FP2; .6 -> TP3 (A:L1, B:dup .6) FP2;
    # .5 -> TP3 FP3 (the .5 det is a duplicate once .6 hit); .3 -> TP3 FP4
    assert f.sensitivity.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0, 1.0])
    assert f.fp_per_subject.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.5, 2.0])
    assert np.all(np.diff(f.sensitivity) >= 0) and np.all(np.diff(f.fp_per_subject) >= 0)
    assert sensitivity_at_fp(f, 0.0) == pytest.approx(1 / 3)
    assert sensitivity_at_fp(f, 0.99) == pytest.approx(1 / 3)
    assert sensitivity_at_fp(f, 1.0) == 1.0
    assert froc_points(f)[3] == {"threshold": 0.6, "fp_per_subject": 1.0, "sensitivity": 1.0}
    assert [p["threshold"] for p in froc_points(f, corners_only=True)] == [0.9, 0.6, 0.3]
    # the threshold-0 cohort counts agree with the last FROC point
    s = summarise([a, b])
    assert s["counts"]["tp"] == 3 and s["counts"]["fp"] == 4 and s["counts"]["fn"] == 0


def test_froc_monotonic_on_random_cohort():
    rng = np.random.default_rng(0)
    rs = []
    for s in range(5):
        refs = [ref(*rng.uniform(-40, 40, 3), d=rng.uniform(2, 9)) for _ in range(6)]
        dets = [det(*(np.asarray(r["centre_lps_mm"]) + rng.normal(0, 2, 3)), p=rng.uniform()) for r in refs]
        dets += [det(*rng.uniform(-40, 40, 3), p=rng.uniform()) for _ in range(10)]
        rs.append(evaluate_subject(f"s{s}", dets, refs))
    f = froc(rs)
    assert np.all(np.diff(f.sensitivity) >= 0) and np.all(np.diff(f.fp_per_subject) >= 0)
    total = summarise(rs, with_froc=False)["counts"]
    assert f.sensitivity[-1] == pytest.approx(total["sensitivity"], abs=1e-6)
    assert f.fp_per_subject[-1] == pytest.approx(total["fp_per_subject"], abs=1e-6)
    # brute force: every threshold re-matched from scratch
    for t, sens, fps in zip(f.thresholds, f.sensitivity, f.fp_per_subject):
        c = cohort_counts([evaluate_subject(r.subject_id, r.detections, r.references, threshold=t) for r in rs])
        assert sens == pytest.approx(c.sensitivity) and fps == pytest.approx(c.fp_per_subject)
