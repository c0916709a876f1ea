"""The complete detector (core.detect.detector) on a small synthetic QSM: two bright spheres (1 ppm,
microbleed-like) and one dark sphere (-1 ppm, calcification-like) in a spherical brain, 1 mm voxels.

Networks: seeded random initialisation (thresholds 0: everything passes), and a hand-set V-Net
whose segmentation is ``chi > 0.5 ppm`` (all convolutions zero except an identity path from the
input to the head), which exercises the segmentation/centroid path with known answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.detect.candidates import ConvScreen
from core.detect.detector import (
    CMBDetector,
    conv_input,
    extract_patches,
    hit_radius_mm,
    non_maximum_suppression,
    normalise_patch,
    write_detector_json,
)
from core.detect.resnet import ResNet3D
from core.detect.vnet import VNet
from core.errors import ConfigError
from core.geometry import Geometry

SHAPE = (48, 48, 48)
BRIGHT = [(16.0, 24.0, 24.0), (32.0, 24.0, 24.0)]
DARK = (24.0, 24.0, 34.0)
RADIUS = 3.0


@pytest.fixture(scope="module")
def scene():
    geom = Geometry.from_parameters(SHAPE, (1.0, 1.0, 1.0), origin_lps=(-20.0, 10.0, 5.0))
    g = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in SHAPE], indexing="ij"), axis=-1)
    mask = np.linalg.norm(g - 23.5, axis=-1) <= 22.0
    rng = np.random.default_rng(0)
    chi = rng.normal(0.0, 0.02, SHAPE).astype(np.float32)
    for c in BRIGHT:
        chi[np.linalg.norm(g - np.array(c), axis=-1) <= RADIUS] = 1.0
    chi[np.linalg.norm(g - np.array(DARK), axis=-1) <= RADIUS] = -1.0
    chi[~mask] = 0.0
    return chi, mask, geom


def _save_models(d: Path, vnet: VNet, *, vnet_threshold: float = 0.0, conv_threshold: float = 0.0,
                 resnet: bool = True) -> Path:
    torch.manual_seed(1)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(ConvScreen().state_dict(), d / "convscreen.pt")
    torch.save(vnet.state_dict(), d / "vnet.pt")
    nets = {"convscreen": {"file": "convscreen.pt", "kwargs": {}}, "vnet": {"file": "vnet.pt", "kwargs": {}}}
    if resnet:
        torch.save(ResNet3D().state_dict(), d / "resnet.pt")
        nets["resnet"] = {"file": "resnet.pt", "kwargs": {}}
    write_detector_json(d, {
        "conv_threshold": conv_threshold, "vnet_threshold": vnet_threshold, "resnet_threshold": 0.0,
        "normalisation": {"scale_ppm": 0.5, "clip": 4.0},
        # a high stage I threshold keeps only the three spheres (noise maxima stay below it)
        "stage1": {"threshold": 0.5, "radii_mm": [1, 2, 3, 4]},
        "networks": nets,
    })
    return d


def _random_vnet() -> VNet:
    torch.manual_seed(0)
    return VNet()


def _threshold_vnet(level_ppm: float = 0.5, scale_ppm: float = 0.5) -> VNet:
    """A V-Net computing seg logit = 10 * (relu(x) - level/scale) with x = chi / scale."""
    net = VNet()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.zero_()
            if "weight" in name and p.ndim == 1:  # batch-norm gamma
                p.fill_(1.0)
        block = net.dec[-1].body  # decoder block at full resolution: input = [up (8), skip (8)]
        block[0][0].weight[0, 8, 1, 1, 1] = 1.0  # skip channel 0 = the input patch
        for layer in block[1:]:
            layer[0].weight[0, 0, 1, 1, 1] = 1.0
        net.head.weight[0, 0] = 10.0
        net.head.bias[0] = -10.0 * level_ppm / scale_ppm
    return net


def _nearest(c, points) -> float:
    return float(min(np.linalg.norm(np.asarray(c) - np.asarray(p)) for p in points))


def test_normalise_patch_scales_and_clips() -> None:
    x = normalise_patch(np.array([0.25, -0.5, 3.0, -9.0]))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, [0.5, -1.0, 4.0, -4.0])
    np.testing.assert_allclose(normalise_patch(np.array([1.0]), scale_ppm=2.0, clip=10.0), [0.5])


def test_patches_and_conv_input_shapes() -> None:
    v = np.arange(10 * 10 * 10, dtype=np.float32).reshape(10, 10, 10)
    p = extract_patches(v, np.array([[5, 5, 5], [0, 0, 0]]), 8)
    assert p.shape == (2, 8, 8, 8) and p[0, 4, 4, 4] == v[5, 5, 5] and p[1, 4, 4, 4] == v[0, 0, 0]
    assert p[1, 0, 0, 0] == 0.0  # zero padding outside the volume
    cubes = np.zeros((1, 7, 7, 7), np.float32)
    cubes[0, 3, 3, 3], cubes[0, 3, 3, 4] = 2.0, 0.9
    ci = conv_input(cubes)
    assert ci.shape == (1, 1, 7, 7, 7) and ci.sum() == 1.0  # 0.9 < 0.5 * 2
    with pytest.raises(ConfigError):
        conv_input(cubes, "other")


def test_non_maximum_suppression_keeps_the_more_probable() -> None:
    centres = np.array([[0.0, 0, 0], [2.0, 0, 0], [10.0, 0, 0], [10.0, 4.0, 0]])
    keep = non_maximum_suppression(centres, np.array([0.6, 0.9, 0.5, 0.7]), np.array([2.0, 2.0, 2.0, 6.0]))
    # 0 is 2 mm from 1 (hit radius 3 mm) -> dropped; 2 is 4 mm from 3 (radius 3 + 1.5 = 4.5) -> dropped
    assert keep == [1, 3]
    assert hit_radius_mm(2.0) == 3.0 and hit_radius_mm(8.0) == 5.5


def test_random_networks_end_to_end(scene, tmp_path) -> None:
    chi, mask, geom = scene
    det = CMBDetector.load(_save_models(tmp_path / "m", _random_vnet()))
    res = det.detect_stages(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    sf = res.findings
    kinds = [f.kind for f in sf.findings]
    assert kinds.count("cmb") == 2 and kinds.count("calcification") == 1, kinds
    sf.check_label_map(SHAPE)
    assert sorted(f.mask_label for f in sf.findings) == [1, 2, 3]
    assert [f.index for f in sf.findings] == [1, 2, 3]
    for f in sf.findings:
        lab = sf.label_map == f.mask_label
        assert lab.sum() * 1.0 == pytest.approx(f.volume_mm3)
        assert np.allclose(np.argwhere(lab).mean(axis=0), f.centre_voxel)
        assert f.mean_chi_ppm == pytest.approx(float(chi[lab].mean()), abs=1e-5)
        assert f.diameter_mm == pytest.approx((6 * f.volume_mm3 / np.pi) ** (1 / 3))
        np.testing.assert_allclose(f.centre_lps_mm, geom.voxel_to_patient(f.centre_voxel), atol=1e-9)
    calc = [f for f in sf.findings if f.kind == "calcification"][0]
    assert _nearest(calc.centre_voxel, [DARK]) <= 2.0 and calc.mean_chi_ppm < -0.5
    for f in sf.microbleeds:
        assert _nearest(f.centre_voxel, BRIGHT) <= 2.0, f  # stage I region or V-Net segment
        assert 0.0 <= f.probability <= 1.0
    assert set(res.stages) == {"stage1", "conv", "vnet", "resnet", "decision", "handcrafted"}
    # the hand-crafted rule keeps the two round bright spheres (volume, length and FA all small)
    assert len(res.stages["handcrafted"]) == 2 and "handcrafted_s" in res.timings_s
    assert len(res.stages["stage1"]) == len(res.stages["conv"]) == len(res.stages["vnet"]) == 2
    assert res.thresholds["rule"] == "vnet" and res.thresholds["decision"] == 0.0
    assert [e["probability"] for e in res.stages["decision"]] == [e["probability"] for e in res.stages["vnet"]]
    assert all(k in res.timings_s for k in ("stage1_s", "conv_s", "vnet_s", "resnet_s", "segment_s", "total_s"))
    json.dumps(sf.to_json())  # serialisable
    plain = det.detect(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    assert "resnet" not in plain.stages and "resnet_s" not in plain.timings_s  # type: ignore[attr-defined]
    assert plain.stages["thresholds"]["rule"] == "vnet"  # type: ignore[attr-defined]
    # the operating point the SR's TID 4019 Algorithm Parameters carry
    params = plain.parameters  # type: ignore[attr-defined]
    assert params == det.config.algorithm_parameters()
    assert f"stage1_threshold={det.config.stage1.threshold:g}" in params
    assert "decision=vnet>=0" in params
    shas = {p.split("=")[0]: p.split("=")[1] for p in params if "_sha256=" in p}
    assert shas == {f"{n}_sha256": net["sha256"][:12] for n, net in det.config.networks.items()}
    assert all(len(v) == 12 for v in shas.values())
    assert json.loads(json.dumps(res.stages_json()))["thresholds"]["vnet"] == 0.0
    assert [f.to_json() for f in plain.findings] == [f.to_json() for f in sf.findings]  # deterministic
    assert json.loads(json.dumps(res.stages_json()))["vnet"][0]["centre_lps_mm"]


def test_threshold_vnet_segments_spheres(scene, tmp_path) -> None:
    chi, mask, geom = scene
    det = CMBDetector.load(_save_models(tmp_path / "m", _threshold_vnet(), vnet_threshold=0.5, resnet=False))
    res = det.detect_stages(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    sf = res.findings
    assert "resnet" not in res.stages
    cmbs = sf.microbleeds
    assert len(cmbs) == 2 and res.segment_source[:2] == ["vnet", "vnet"]
    n_sphere = int((np.linalg.norm(np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
                                   - np.array(BRIGHT[0]), axis=-1) <= RADIUS).sum())
    for f in cmbs:
        assert _nearest(f.centre_voxel, BRIGHT) <= 0.5  # centroid of the segmented sphere
        assert f.volume_mm3 == n_sphere  # segment = exactly the sphere's voxels
        assert f.mean_chi_ppm == pytest.approx(1.0)
        assert f.probability > 0.99
    assert [f.kind for f in sf.mimics] == ["calcification"]


def test_decision_rule_mean_of_vnet_and_resnet(scene, tmp_path) -> None:
    """Rule "mean": a survivor is a microbleed when (V-Net p + ResNet p) / 2 reaches the decision
    threshold; the findings carry that probability, the stage lists keep every survivor."""
    chi, mask, geom = scene
    d = _save_models(tmp_path / "m", _threshold_vnet(), vnet_threshold=0.5)
    cfg = json.loads((d / "detector.json").read_text())
    det = CMBDetector.load(d)
    res = det.detect_stages(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    v = np.array([e["probability"] for e in res.stages["vnet"]])
    r = np.array([e["probability"] for e in res.stages["resnet"]])
    mean = 0.5 * (v + r)
    for thr, expect in ((float(mean.min()) - 1e-6, 2), (float(mean.max()) + 1e-6, 0)):
        cfg["decision"] = {"rule": "mean", "threshold": thr}
        (d / "detector.json").write_text(json.dumps(cfg))
        det = CMBDetector.load(d)
        assert det.config.threshold == thr
        out = det.detect_stages(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t", with_resnet=False)
        assert "resnet" in out.stages  # the rule needs it even when the comparator is not asked for
        np.testing.assert_allclose([e["probability"] for e in out.stages["decision"]], mean, atol=1e-6)
        assert len(out.findings.microbleeds) == expect
        for f in out.findings.microbleeds:
            assert f.probability == pytest.approx(float(mean.max() if f.probability > mean.min() + 1e-9 else mean.min()), abs=1e-6)
    (d / "resnet.pt").unlink()
    with pytest.raises(ConfigError, match="needs the ResNet weights"):
        CMBDetector.load(d)
    cfg["decision"] = {"rule": "vote", "threshold": 0.5}
    (d / "detector.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="decision rule must be one of"):
        CMBDetector.load(d)


def test_negative_sphere_never_a_microbleed(scene, tmp_path) -> None:
    chi, mask, geom = scene
    det = CMBDetector.load(_save_models(tmp_path / "m", _random_vnet(), resnet=False))
    sf = det.detect(-chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    # polarity swapped: the two (now dark) spheres are calcifications, the bright one a microbleed
    assert sorted(f.kind for f in sf.findings) == ["calcification", "calcification", "cmb"]
    assert _nearest(sf.microbleeds[0].centre_voxel, [DARK]) <= 2.0
    assert sf.timings_s["total_s"] > 0  # type: ignore[attr-defined]


def test_calcification_needs_dark_peak_and_radial_symmetry(scene, tmp_path) -> None:
    """A dark focus is labelled a calcification only when its peak is below calcification_peak_ppm
    and its diamagnetic FRST score reaches calcification_frst_min (both read from detector.json)."""
    chi, mask, geom = scene
    d = _save_models(tmp_path / "m", _random_vnet(), resnet=False)
    cfg = json.loads((d / "detector.json").read_text())
    res = CMBDetector.load(d).detect_stages(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    calc = [f for f in res.findings.mimics if f.kind == "calcification"]
    assert len(calc) == 1 and _nearest(calc[0].centre_voxel, [DARK]) <= 1.0
    for key, value, expect in (("calcification_frst_min", 1e6, 0), ("calcification_peak_ppm", -1.5, 0),
                               ("calcification_frst_min", 1.5, 1)):
        cfg[key] = value
        (d / "detector.json").write_text(json.dumps(cfg))
        det = CMBDetector.load(d)
        assert getattr(det.config, key) == value
        sf = det.detect(chi, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
        assert sum(f.kind == "calcification" for f in sf.mimics) == expect, (key, value)
        cfg.pop(key)


def test_missing_and_corrupt_model_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="has no detector.json"):
        CMBDetector.load(tmp_path)
    d = _save_models(tmp_path / "m", _random_vnet(), resnet=False)
    (d / "vnet.pt").unlink()
    with pytest.raises(ConfigError, match="vnet.pt named in detector.json is missing") as ei:
        CMBDetector.load(d)
    assert "\n" not in str(ei.value)
    (d / "detector.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CMBDetector.load(d)
    (d / "detector.json").write_text(json.dumps({"networks": {"vnet": {"file": "vnet.pt", "sha256": "0"}}}))
    with pytest.raises(ConfigError, match="convscreen"):
        CMBDetector.load(d)


def test_sha256_mismatch_and_wrong_architecture(tmp_path) -> None:
    d = _save_models(tmp_path / "m", _random_vnet(), resnet=False)
    torch.manual_seed(5)
    torch.save(ConvScreen().state_dict(), d / "convscreen.pt")  # retrained file, old json
    with pytest.raises(ConfigError, match="does not match the sha256"):
        CMBDetector.load(d)
    torch.save(ConvScreen(channels=4).state_dict(), d / "convscreen.pt")
    cfg = json.loads((d / "detector.json").read_text())
    write_detector_json(d, cfg)  # sums now match, the architecture (8 channels) does not
    with pytest.raises(ConfigError, match="cannot be loaded as the convscreen network") as ei:
        CMBDetector.load(d)
    assert "\n" not in str(ei.value)
    cfg["stage1"] = {"no_such_setting": 1}
    (d / "detector.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown stage1 settings"):
        CMBDetector.load(d)


def test_no_candidates_gives_an_empty_study(scene, tmp_path) -> None:
    _, mask, geom = scene
    noise = np.random.default_rng(3).normal(0.0, 0.02, SHAPE).astype(np.float32) * mask
    det = CMBDetector.load(_save_models(tmp_path / "m", _random_vnet()))
    res = det.detect_stages(noise, mask, geom, study_instance_uid="1.2.3", algorithm_version="t")
    assert res.findings.findings == [] and not res.findings.label_map.any()
    assert res.stages["stage1"] == [] and res.stages["vnet"] == [] and res.stages["resnet"] == []
    assert res.findings.to_json()["n_microbleeds"] == 0
