"""Clinical summary: counts, MARS table, size classes, mimics and the distribution pattern."""

from __future__ import annotations

import pytest

from core.findings import Finding, StudyFindings
from core.report.summary import CAVEAT, clinical_summary, distribution_pattern

CAT = {"frontal": "lobar", "occipital": "lobar", "thalamus": "deep", "basal_ganglia": "deep",
       "brainstem": "infratentorial", "cerebellum": "infratentorial"}


def _f(index, region, side="left", p=0.9, d=3.0, kind="cmb"):
    return Finding(index=index, kind=kind, centre_lps_mm=(0.0, 0.0, 0.0), centre_voxel=(0.0, 0.0, 0.0),
                   diameter_mm=d, volume_mm3=1.0, mean_chi_ppm=0.5 if kind == "cmb" else -0.4,
                   probability=p, mars_region=region, mars_category=CAT[region], side=side)


def _study(*items):
    return StudyFindings("1.2.3", "0.1.0", list(items))


def test_counts_table_sizes_and_mimics():
    s = clinical_summary(_study(
        _f(1, "frontal", "left", 0.95, 3.0), _f(2, "frontal", "left", 0.5, 6.0), _f(3, "frontal", "right", 0.85, 2.5),
        _f(4, "thalamus", "right", 0.6, 4.0), _f(5, "brainstem", "midline", 0.9, 7.0),
        _f(6, "basal_ganglia", "left", 0.99, 5.0, kind="calcification")))
    assert s["n_microbleeds"] == 5
    assert (s["n_definite"], s["n_possible"]) == (3, 2)
    assert s["by_category"] == {"lobar": 3, "deep": 1, "infratentorial": 1}
    rows = {r["region"]: r for r in s["mars_table"]}
    assert list(rows) == ["frontal", "thalamus", "brainstem"]  # MARS order, only regions with microbleeds
    assert rows["frontal"]["left"] == {"definite": 1, "possible": 1}
    assert rows["frontal"]["right"] == {"definite": 1, "possible": 0}
    assert rows["frontal"]["total"] == 3
    assert rows["brainstem"]["midline"] == {"definite": 1, "possible": 0}
    assert s["size_classes"] == {"2-5mm": 3, "5-10mm": 2}
    assert [m["index"] for m in s["microbleeds"]] == [1, 2, 3, 4, 5]
    assert [m["diameter_mm"] for m in s["microbleeds"]] == [3.0, 6.0, 2.5, 4.0, 7.0]
    assert [(m["index"], m["kind"]) for m in s["mimics"]] == [(6, "calcification")]
    assert "basal_ganglia" not in rows  # the mimic is not counted as a microbleed
    assert "Cerebral microbleeds (QSM): 5 (3 definite, 2 possible)" in s["text"]
    assert "Mimics (not counted as microbleeds)" in s["text"]


@pytest.mark.parametrize("regions, pattern, phrase", [
    ((), "none", "No cerebral microbleeds"),
    (("frontal", "occipital"), "strictly lobar", "probable cerebral amyloid angiopathy"),
    (("frontal",), "strictly lobar", "possible cerebral amyloid angiopathy"),
    (("frontal", "frontal", "cerebellum"), "strictly lobar", "cerebellar microbleeds are not counted"),
    (("thalamus", "basal_ganglia"), "strictly deep", "excludes probable and possible CAA"),
    (("frontal", "thalamus"), "mixed", "not met"),
    (("frontal", "brainstem"), "mixed", "1 lobar and 1 deep"),
    (("brainstem", "cerebellum"), "infratentorial only", "1 brainstem and 1 cerebellar"),
    (("thalamus", "cerebellum"), "strictly deep", "1 deep"),
])
def test_pattern_statement(regions, pattern, phrase):
    findings = _study(*[_f(n, r) for n, r in enumerate(regions, start=1)])
    s = clinical_summary(findings)
    assert s["pattern"] == pattern == distribution_pattern(findings.microbleeds)
    assert phrase in s["pattern_statement"]
    if regions:
        assert s["pattern_statement"].endswith(CAVEAT)
        assert "age >= 50" in s["pattern_statement"]


def test_mimics_do_not_make_a_pattern():
    s = clinical_summary(_study(_f(1, "frontal", kind="calcification"), _f(2, "thalamus", kind="iron")))
    assert s["n_microbleeds"] == 0 and s["pattern"] == "none"
    assert len(s["mimics"]) == 2
