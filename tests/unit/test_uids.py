"""Stable result UIDs (core.uids): deterministic, distinct where they must be, valid DICOM UIDs."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from core.uids import derived_uid, is_valid_uid, result_instance_uid, result_series_uid

STUDY = "1.2.826.0.1.3680043.8.498.1"
SOURCE = "1.2.826.0.1.3680043.8.498.2"


def test_same_parts_give_the_same_uid_and_the_expected_form():
    a = derived_uid("x", "y")
    assert a == derived_uid("x", "y")
    assert a.startswith("2.25.")
    assert is_valid_uid(a) and UID(a).is_valid
    assert len(a) <= 44  # 5 + at most 39 digits of a 128-bit integer


def test_the_namespace_is_frozen():
    # changing the namespace would silently change every UID ever sent to a PACS
    assert derived_uid("series", "a", "b", "QSM STAR-QSM", "1.0.0") == derived_uid(
        "series", "a", "b", "QSM STAR-QSM", "1.0.0"
    )
    assert derived_uid("probe") == "2.25.150800990120218437172948347744471694230"


def test_different_splits_of_the_same_characters_differ():
    assert derived_uid("a|b", "c") != derived_uid("a", "b|c")
    assert derived_uid("ab") != derived_uid("a", "b")


def test_series_uid_changes_with_each_identifying_part():
    base = result_series_uid(STUDY, SOURCE, "QSM STAR-QSM", "1.0.0")
    assert base == result_series_uid(STUDY, SOURCE, "QSM STAR-QSM", "1.0.0")
    others = {
        result_series_uid(STUDY + "9", SOURCE, "QSM STAR-QSM", "1.0.0"),
        result_series_uid(STUDY, SOURCE + "9", "QSM STAR-QSM", "1.0.0"),
        result_series_uid(STUDY, SOURCE, "QSM TKD", "1.0.0"),
        result_series_uid(STUDY, SOURCE, "QSM STAR-QSM", "1.0.1"),
    }
    assert base not in others and len(others) == 4
    assert all(is_valid_uid(u) for u in others | {base})


def test_instance_uids_are_stable_and_distinct_per_index():
    series = result_series_uid(STUDY, SOURCE, "QSM STAR-QSM", "1.0.0")
    uids = [result_instance_uid(series, k) for k in range(500)]
    assert uids == [result_instance_uid(series, k) for k in range(500)]
    assert len(set(uids)) == 500 and series not in uids
    assert all(is_valid_uid(u) for u in uids)


@pytest.mark.parametrize("uid,ok", [
    ("1.2.3", True), ("2.25.0", True), ("1.02.3", False), ("1..2", False), ("1.2.", False),
    ("1.2.a", False), ("", False), ("1." + "1" * 63, False),
])
def test_uid_grammar(uid, ok):
    assert is_valid_uid(uid) is ok


def test_refuses_empty_identifying_parts():
    with pytest.raises(ValueError):
        derived_uid()
    with pytest.raises(ValueError):
        result_series_uid(STUDY, "", "QSM TKD", "1.0.0")
    with pytest.raises(ValueError):
        result_series_uid(STUDY, SOURCE, "QSM TKD", "")
    with pytest.raises(ValueError):
        result_instance_uid("1.2.3", -1)
