"""training.evaluate on a tiny hand-made cohort: tables, JSON and FROC PNG."""

import json

import pytest

from core.findings import Finding, StudyFindings
from training import evaluate as E


def _lesion(x, d=3.0, kind="cmb", region="frontal", cat="lobar"):
    return {"kind": kind, "centre_lps_mm": [x[0], x[1], x[2]], "centre_voxel": [0, 0, 0], "diameter_mm": d,
            "chi_ppm": 0.5, "r2star_s": 80.0, "mars_region": region, "mars_category": cat, "side": "left"}


def _finding(i, c, p, kind="cmb"):
    return Finding(i, kind, tuple(c), (0.0, 0.0, 0.0), 3.0, 14.0, 0.4, p)


def _truth(path, sid, lesions, control=False, simulated=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"subject_id": sid, "simulated": simulated, "control": control, "lesions": lesions}))


def _cohort(tmp_path, simulated=True):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    # sub-000: 2 microbleeds + 1 calcification; final: 1 hit, 1 FP on the calcification, a calcification mimic
    _truth(truth / "sub-000" / "truth" / "truth.json", "sub-000", [
        _lesion((0, 0, 0), 3.0, region="frontal"),
        _lesion((30, 0, 0), 6.0, region="thalamus", cat="deep"),
        _lesion((60, 0, 0), 3.0, kind="calcification", region="basal_ganglia", cat="deep"),
    ], simulated=simulated)
    (pred / "sub-000").mkdir(parents=True)
    StudyFindings("1.2.3", "test", [
        _finding(1, (1, 0, 0), 0.9), _finding(2, (60.5, 0, 0), 0.6), _finding(3, (61, 0, 0), 0.8, "calcification"),
    ]).save(pred / "sub-000" / "findings.json")
    (pred / "sub-000" / "stages.json").write_text(json.dumps({
        "stage1": [{"centre_lps_mm": [0, 0, 0], "probability": 0.5}, {"centre_lps_mm": [30, 0, 0], "probability": 0.5},
                   {"centre_lps_mm": [60, 0, 0], "probability": 0.5}, {"centre_lps_mm": [90, 0, 0], "probability": 0.5}],
        "vnet": [{"centre_lps_mm": [0.5, 0, 0], "probability": 0.9}, {"centre_lps_mm": [60, 0, 0], "probability": 0.6}],
    }))
    # sub-001 (flat truth layout): 1 microbleed d=2 (hit radius 3), hit at exactly 2.9 mm, one FP
    _truth(truth / "sub-001" / "truth.json", "sub-001", [_lesion((0, 0, 0), 2.0, region="cerebellum",
                                                                   cat="infratentorial")], simulated=simulated)
    (pred / "sub-001").mkdir(parents=True)
    StudyFindings("1.2.4", "test", [_finding(1, (0, 2.9, 0), 0.7), _finding(2, (0, 10, 0), 0.3)]).save(
        pred / "sub-001" / "findings.json")
    # sub-002: control, nothing found at the end, one stage-1 candidate
    _truth(truth / "sub-002" / "truth" / "truth.json", "sub-002", [], control=True, simulated=simulated)
    (pred / "sub-002").mkdir(parents=True)
    StudyFindings("1.2.5", "test", []).save(pred / "sub-002" / "findings.json")
    (pred / "sub-002" / "stages.json").write_text(json.dumps({"stage1": [{"centre_lps_mm": [5, 5, 5], "probability": 1}]}))
    # sub-003: control without predictions
    _truth(truth / "sub-003" / "truth" / "truth.json", "sub-003", [], control=True, simulated=simulated)
    return pred, truth


def test_cli_tables_json_png(tmp_path, capsys):
    pred, truth = _cohort(tmp_path)
    out, png = tmp_path / "res" / "detection.json", tmp_path / "res" / "froc.png"
    rc = E.main(["--predictions", str(pred), "--truth", str(truth), "--out", str(out), "--froc-png", str(png)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["simulated"] is True and r["n_subjects"] == 4 and r["n_controls"] == 2 and r["n_reference_cmb"] == 3
    assert r["missing_predictions"] == ["sub-003"]
    fin = r["stages"]["final"]
    assert {k: fin["counts"][k] for k in ("tp", "fn", "fp", "n_subjects")} == {"tp": 2, "fn": 1, "fp": 2, "n_subjects": 4}
    assert fin["counts"]["sensitivity"] == pytest.approx(2 / 3, abs=1e-6)
    assert fin["counts"]["ppv"] == 0.5 and fin["counts"]["fp_per_subject"] == 0.5
    assert fin["by_size"] == {"2-5mm": {"n": 2, "tp": 2, "sensitivity": 1.0}, "5-10mm": {"n": 1, "tp": 0, "sensitivity": 0.0}}
    assert fin["by_mars_region"]["thalamus"]["sensitivity"] == 0.0
    assert fin["by_mars_region"]["cerebellum"]["sensitivity"] == 1.0
    assert fin["controls"]["fraction_without_fp"] == 1.0
    assert fin["calcifications"]["reported_as_cmb"] == 1 and fin["calcifications"]["n_calcifications"] == 1
    pts = [(p["threshold"], p["fp_per_subject"], round(p["sensitivity"], 4)) for p in fin["froc"]["points"]]
    # all thresholds: (0.9, 0, 1/3), (0.7, 0, 2/3), (0.6, 0.25, 2/3), (0.3, 0.5, 2/3); corners kept
    assert pts == [(0.9, 0.0, 0.3333), (0.7, 0.0, 0.6667), (0.3, 0.5, 0.6667)]
    assert fin["froc"]["n_thresholds"] == 4
    assert fin["froc"]["sensitivity_at_fp"]["0.5"] == pytest.approx(2 / 3, abs=1e-6)
    s1 = r["stages"]["stage1"]
    assert s1["table"] == "2" and (s1["counts"]["tp"], s1["counts"]["fn"], s1["counts"]["fp"], s1["tp_plus_fp"]) == (2, 1, 3, 5)
    v = r["stages"]["vnet"]
    assert v["table"] == "3" and (v["counts"]["tp"], v["counts"]["fn"], v["counts"]["fp"]) == (1, 2, 1)
    text = capsys.readouterr().out
    assert "Table 2 style" in text and "Table 3 style" in text and "SIMULATED" in text
    row = next(l for l in text.splitlines() if l.startswith("final "))
    assert row.split() == ["final", "2", "1", "2", "66.7%", "50.0%", "0.50", "0.57"]  # F1 = 4 / 7
    row = next(l for l in text.splitlines() if l.startswith("stage1 "))
    assert row.split() == ["stage1", "2", "66.7%", "5"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_threshold_and_real_data_flag(tmp_path):
    pred, truth = _cohort(tmp_path, simulated=False)
    r = E.evaluate(pred, truth, threshold=0.65)
    assert r["simulated"] is False
    c = r["stages"]["final"]["counts"]
    assert (c["tp"], c["fn"], c["fp"]) == (2, 1, 0)  # the 0.6 and 0.3 FPs are dropped
    assert r["stages"]["final"]["froc"]["n_thresholds"] == 4  # the FROC still spans every threshold
    assert r["stages"]["final"]["missed"] == [
        {"subject_id": "sub-000", "centre_lps_mm": [30.0, 0.0, 0.0], "diameter_mm": 6.0, "mars_region": "thalamus"}]
    cd = r["calcification_detection"]
    assert (cd["tp"], cd["fn"], cd["fp"]) == (1, 0, 0)  # the calcification mimic at 1 mm from the truth


def test_missing_folders_are_refused(tmp_path, capsys):
    assert E.main(["--predictions", str(tmp_path / "nope"), "--truth", str(tmp_path)]) == 2
    assert "no <subject>/truth" in capsys.readouterr().err


def test_stage_operating_thresholds(tmp_path):
    """stages.json "thresholds": that stage's row is scored at its threshold, its FROC over all."""
    pred, truth = _cohort(tmp_path)
    sj = pred / "sub-000" / "stages.json"
    d = json.loads(sj.read_text())
    d["thresholds"] = {"rule": "vnet", "vnet": 0.7}
    sj.write_text(json.dumps(d))
    r = E.evaluate(pred, truth)
    v = r["stages"]["vnet"]
    assert v["operating_threshold"] == 0.7
    assert (v["counts"]["tp"], v["counts"]["fp"]) == (1, 0)  # the 0.6 candidate on the calcification is below it
    assert v["froc"]["n_thresholds"] == 2  # 0.9 and 0.6: the curve still spans both
    assert "operating_threshold" not in r["stages"]["stage1"]
    # two subjects predicted with different thresholds: refused, one model per evaluation
    (pred / "sub-002" / "stages.json").write_text(json.dumps({"stage1": [], "thresholds": {"vnet": 0.5}}))
    with pytest.raises(E.ConfigError, match="different vnet thresholds"):
        E.evaluate(pred, truth)
