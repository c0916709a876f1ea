"""bench.detection_family: per-family scoring with the acquisition and lesion-shape breakdowns."""

from __future__ import annotations

import json

import pytest

from bench import detection_family as D


def _cohort(root, family, spacing, b0, lesions, detections):
    sub = root / "sub-000"
    (sub / "truth").mkdir(parents=True)
    (sub / "truth" / "truth.json").write_text(json.dumps({
        "simulated": True, "subject_id": "sub-000", "control": False, "family": family,
        "geometry": {"spacing_mm": spacing}, "lesions": lesions,
        "acquisition": {"echo_times_s": [0.005, 0.015, 0.03], "field_strength_t": b0, "snr": 20.0}}))
    (root / "cohort.json").write_text(json.dumps({"seed": 77}))
    pred = root.parent / (root.name + "_preds") / "sub-000"
    pred.mkdir(parents=True)
    (pred / "findings.json").write_text(json.dumps({"microbleeds": detections, "mimics": []}))
    (pred / "detection.json").write_text(json.dumps({"algorithm_version": "v test"}))
    return root, pred.parent


def _lesion(x, shape, chi):
    return {"kind": "cmb", "centre_lps_mm": [x, 0.0, 0.0], "diameter_mm": 4.0, "chi_ppm": chi,
            "mars_region": "frontal", "mars_category": "lobar", "shape": {"kind": shape}}


def test_breakdowns_and_comparison(tmp_path):
    t, p = _cohort(tmp_path / "r", "randomised", [0.6, 0.6, 1.3], 7.0,
                   [_lesion(0.0, "ellipsoid", 0.2), _lesion(40.0, "lobulated", 1.2)],
                   [{"centre_lps_mm": [0.5, 0.0, 0.0], "probability": 0.9, "kind": "cmb"}])
    out = tmp_path / "res.json"
    assert D.main(["--cohort", "randomised", str(t), str(p), str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["family"] == "randomised" and r["simulated"] and r["model"]["retrained"] is False
    assert r["model"]["detection_versions"] == ["v test"]
    b = r["by_acquisition"]
    assert b["lesion_shape"] == {"ellipsoid": {"n": 1, "tp": 1, "sensitivity": 1.0},
                                 "lobulated": {"n": 1, "tp": 0, "sensitivity": 0.0}}
    assert b["field_strength_t"]["7 T"] == {"n": 2, "tp": 1, "sensitivity": 0.5}
    assert set(b["voxel_inplane_mm"]) == {"<0.8"} and set(b["snr"]) == {"<25"}
    assert b["lesion_chi_ppm"] == {"<0.3": {"n": 1, "tp": 1, "sensitivity": 1.0},
                                   "1.0-1.5": {"n": 1, "tp": 0, "sensitivity": 0.0}}
    assert r["comparison"]["randomised"]["sensitivity"] == 0.5
    assert r["acquisitions"]["sub-000"]["n_echoes"] == 3


def test_family_mismatch_refused(tmp_path):
    t, p = _cohort(tmp_path / "d", "default", [1.0, 1.0, 1.0], 3.0, [], [])
    with pytest.raises(SystemExit, match="families"):
        D.main(["--cohort", "randomised", str(t), str(p), str(tmp_path / "x.json")])
