"""The findings record shared by detection, localisation and reports."""

import numpy as np
import pytest

from core.findings import Finding, StudyFindings


def _f(i, kind="cmb", p=0.9, d=3.0):
    return Finding(i, kind, (1.0, 2.0, 3.0), (10.0, 11.0, 12.0), d, 4 / 3 * np.pi * (d / 2) ** 3, 0.6, p, mask_label=i)


def test_round_trip_and_derived_fields(tmp_path):
    sf = StudyFindings("1.2.3", "cmb-qsm 0.1.0", [_f(1, p=0.95, d=6.0), _f(2, p=0.6), _f(3, kind="calcification", p=0.9)])
    assert [f.certainty for f in sf.microbleeds] == ["definite", "possible"]
    assert [f.size_class for f in sf.microbleeds] == ["5-10mm", "2-5mm"]
    d = sf.to_json()
    assert d["n_microbleeds"] == 2 and len(d["mimics"]) == 1
    back = StudyFindings.load(sf.save(tmp_path / "findings.json"))
    assert [f.to_json() for f in back.findings] == [f.to_json() for f in sf.findings]


def test_invalid_values_refused():
    with pytest.raises(ValueError, match="kind"):
        _f(1, kind="vessel")
    with pytest.raises(ValueError, match="probability"):
        _f(1, p=1.5)


def test_label_map_consistency():
    lm = np.zeros((4, 4, 4), np.int16)
    lm[1, 1, 1] = 1
    sf = StudyFindings("1.2", "v", [_f(1), _f(2)], lm)
    with pytest.raises(ValueError, match=r"\[2\]"):
        sf.check_label_map((4, 4, 4))
    with pytest.raises(ValueError, match="does not match"):
        sf.check_label_map((4, 4, 5))
