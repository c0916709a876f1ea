"""The version the detection results carry (app.app.detection_version): code version plus a digest
of the model folder's detector.json, so a model update gives new result UIDs."""

from __future__ import annotations

import json

from app.app import ALGORITHM_VERSION, detection_version
from core.uids import result_series_uid


def test_digest_follows_detector_json(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "detector.json").write_text(json.dumps({"decision": {"rule": "vnet", "threshold": 0.5}}))
    (b / "detector.json").write_text(json.dumps({"decision": {"rule": "vnet", "threshold": 0.4}}))
    va, vb = detection_version(a), detection_version(b)
    assert va.startswith(ALGORITHM_VERSION + " model ") and len(va) == len(ALGORITHM_VERSION) + 15
    assert va != vb and detection_version(a) == va  # another operating point: another version; stable
    uid = lambda v: result_series_uid("1.2.3", "1.2.3.4", "SR CMB", v)  # noqa: E731
    assert uid(va) != uid(vb)  # so a re-run after a model update writes new series
    # the longest description it goes into stays within DICOM LO (64 characters)
    assert len(f"CMB segmentation (CMB-QSM {va})") <= 64


def test_missing_detector_json_gives_the_code_version(tmp_path) -> None:
    assert detection_version(tmp_path) == ALGORITHM_VERSION


def test_shipped_models_have_a_digest() -> None:
    assert detection_version().startswith(ALGORITHM_VERSION + " model ")
