"""Detection and report operators on one simulated study (3 mm, classic Siemens DICOM):
simulate -> write DICOM -> load_gre -> QSM -> CMBDetectorOperator -> CMBReportWriterOperator.

Networks are seeded random initialisations saved with a detector.json whose thresholds are 0
(every candidate passes), so the numbers checked are structural (files, label map, kinds, UIDs,
DICOM validity), not detection accuracy. The operators' ``compute`` runs with minimal stand-ins for
the SDK's input/output contexts.
"""

from __future__ import annotations

import json

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from core.detect.candidates import ConvScreen
from core.detect.detector import write_detector_json
from core.detect.vnet import VNet
from core.dicom.reader import load_gre
from core.errors import ConfigError
from core.findings import StudyFindings
from core.qsm.pipeline import reconstruct
from tests.conftest import dciodvfy_errors
from training.sim.dicom_writer import write_study
from training.sim.phantom import simulate_subject

VERSION = "0.1.0-test"
pytestmark = pytest.mark.slow  # one 4 mm simulation and QSM (~20-40 s on 2 shared cores)


class _In:
    def __init__(self, **items) -> None:
        self.items = items

    def receive(self, name: str):
        return self.items[name]


class _Out:
    def __init__(self) -> None:
        self.items: dict = {}

    def emit(self, value, name: str) -> None:
        self.items[name] = value


def _models(d):
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(ConvScreen().state_dict(), d / "convscreen.pt")
    torch.save(VNet().state_dict(), d / "vnet.pt")
    # stage I defaults are calibrated for 1 mm (5-voxel erosion, 1-5 mm radii): at 3 mm use a
    # 1-voxel erosion and 3-6 mm radii (also exercises detector.json's stage1 section)
    write_detector_json(d, {"conv_threshold": 0.0, "vnet_threshold": 0.0,
                            "stage1": {"erosion_voxels": 1, "radii_mm": [3.0, 6.0]},
                            "networks": {"convscreen": {"file": "convscreen.pt"}, "vnet": {"file": "vnet.pt"}}})
    return d


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("detapp")
    study = simulate_subject("det", 3, voxel_mm=(3, 3, 3), n_cmb=4, n_calc=1, cmb_diameter_mm=(6, 10))
    write_study(study, root / "dicom", "siemens")
    gre = load_gre(root / "dicom")
    qsm = reconstruct(gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.field_strength_t, gre.geometry)
    return dict(study=study, gre=gre, qsm=qsm, models=_models(root / "models"), root=root)


def test_operators_write_findings_and_dicom(case) -> None:
    from monai.deploy.core import Application

    from operators.cmb_detector import CMBDetectorOperator
    from operators.report_writer import CMBReportWriterOperator

    app = Application()
    det = CMBDetectorOperator(app, algorithm_version=VERSION, model_dir=case["models"], name="detect")
    out = _Out()
    det.compute(_In(gre=case["gre"], qsm=case["qsm"]), out, None)
    assert set(out.items) == {"gre", "qsm", "findings"}
    sf: StudyFindings = out.items["findings"]
    gre = case["gre"]
    assert sf.study_instance_uid == gre.study_instance_uid and sf.algorithm_version == VERSION
    assert len(sf.microbleeds) >= 1  # thresholds 0: every surviving stage I candidate is reported
    sf.check_label_map(gre.geometry.shape)
    assert sorted(np.unique(sf.label_map[sf.label_map > 0]).tolist()) == [f.mask_label for f in sf.findings]
    assert all(f.kind in ("cmb", "calcification") for f in sf.findings)
    for f in sf.mimics:
        assert f.mean_chi_ppm < 0  # calcification mimics are diamagnetic
    for f in sf.microbleeds:
        assert f.mean_chi_ppm > 0
    # geometry end to end: every finding's LPS centre is its voxel centroid through the source
    # geometry, and that voxel carries the finding's own label. (Whether the true lesions are found
    # is the evaluation's question, on 1 mm data with trained weights; at 3 mm with random networks
    # the single-voxel calcification is not separable from diamagnetic noise.)
    for f in sf.findings:
        np.testing.assert_allclose(gre.geometry.voxel_to_patient(f.centre_voxel), f.centre_lps_mm, atol=1e-6)
        assert (sf.label_map == f.mask_label).sum() * gre.geometry.voxel_volume_mm3 == pytest.approx(f.volume_mm3)
    assert sf.timings_s["total_s"] > 0  # type: ignore[attr-defined]

    out_dir = case["root"] / "out"
    rep = CMBReportWriterOperator(app, output_folder=out_dir, algorithm_version=VERSION, name="report")
    rep.compute(_In(gre=gre, qsm=case["qsm"], findings=sf), _Out(), None)
    back = StudyFindings.load(out_dir / "findings.json")
    assert len(back.findings) == len(sf.findings)
    np.testing.assert_allclose([f.centre_lps_mm for f in back.findings], [f.centre_lps_mm for f in sf.findings],
                               atol=1e-3)
    stages = json.loads((out_dir / "stages.json").read_text())
    base = {"stage1", "conv", "vnet", "decision", "thresholds"}
    assert base <= set(stages) <= base | {"resnet"} and len(stages["decision"]) >= len(sf.microbleeds)
    assert sum(e["probability"] >= stages["thresholds"]["decision"] for e in stages["decision"]) >= len(sf.microbleeds)
    assert json.loads((out_dir / "detection.json").read_text())["seconds"]["vnet_s"] >= 0
    summary = json.loads((out_dir / "cmb_summary.json").read_text())
    assert str(len(sf.microbleeds)) in (out_dir / "cmb_summary.txt").read_text()
    assert summary
    dcm = out_dir / "dicom" / "cmb"
    sr = pydicom.dcmread(dcm / "SR_CMB.dcm")
    seg = pydicom.dcmread(dcm / "SEG_CMB.dcm")
    keys = sorted(dcm.glob("KEY_*.dcm"))
    assert len(keys) == len(sf.findings)
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == gre.study_instance_uid
    assert seg.Modality == "SEG" and sr.Modality == "SR"
    for p in (dcm / "SR_CMB.dcm", dcm / "SEG_CMB.dcm", keys[0], dcm / "KO_CMB.dcm"):
        assert dciodvfy_errors(p) == [], p
    # the detector's operating point reaches the SR (TID 4019), the planar circles every finding
    (measurements,) = [it for it in sr.ContentSequence if it.ConceptNameCodeSequence[0].CodeValue == "126010"]
    params = [it.TextValue for it in measurements.ContentSequence[0].ContentSequence
              if it.ValueType == "TEXT" and it.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert params == sf.parameters and any(p.startswith("stage1_threshold=") for p in params)  # type: ignore
    planar = hd.sr.srread(dcm / "SR_CMB.dcm").content.get_planar_roi_measurement_groups()
    n_qsm = len(list((out_dir / "dicom" / "qsm").glob("*.dcm")))  # with a QSM series, a circle on it too
    assert len(planar) == len(sf.findings) * (2 if n_qsm else 1)
    kos = pydicom.dcmread(dcm / "KO_CMB.dcm")
    assert kos.StudyInstanceUID == gre.study_instance_uid


def test_operator_refuses_a_missing_model_folder(case, tmp_path, monkeypatch) -> None:
    from monai.deploy.core import Application

    from operators.cmb_detector import CMBDetectorOperator, resolve_model_dir

    monkeypatch.setenv("HOLOSCAN_MODEL_PATH", str(tmp_path / "nowhere"))
    assert resolve_model_dir(None) == tmp_path / "nowhere"
    assert resolve_model_dir(case["models"]) == case["models"]
    with pytest.raises(ConfigError, match="has no detector.json"):
        CMBDetectorOperator(Application(), algorithm_version=VERSION, name="detect")
