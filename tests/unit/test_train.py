"""Stage II training (training.train, training.augment) on tiny synthetic shards made here."""

import json
import os

import numpy as np
import pytest
import torch

from core.detect.vnet import VNet
from training.augment import PatchAugmenter
from training.dataset import write_shard
from core.detect.detector import CMBDetector
from training.train import (choose_decision, load_shards, main, normalise_patches, operating_point, predict,
                            roc_auc, sens_spec, threshold_for_sensitivity, youden_threshold)

S = 32


def _sphere(r, c=(16, 16, 16)):
    g = np.indices((S, S, S)).astype(np.float32)
    return (((g - np.asarray(c, np.float32)[:, None, None, None]) ** 2).sum(0) <= r * r).astype(np.uint8)


def _tube(rng):
    m = np.zeros((S, S, S), np.uint8)
    ax = rng.integers(0, 3)
    sl = [slice(15, 17)] * 3
    sl[ax] = slice(None)
    m[tuple(sl)] = 1
    return m


def _shard(folder, sid, seed, n_pos, n_neg, n_dia=2):
    """Positives: bright spheres (0.8 ppm); negatives: tubes (0.4 ppm) or noise; plus diamagnetic
    spheres flagged ``diamagnetic`` (must be excluded)."""
    rng = np.random.default_rng(seed)
    patches, masks, labels, dia = [], [], [], []
    for i in range(n_pos + n_neg + n_dia):
        noise = rng.normal(0, 0.05, (S, S, S)).astype(np.float32)
        if i < n_pos:
            m = _sphere(rng.uniform(2, 3.5))
            patches.append(noise + 0.8 * m); masks.append(m); labels.append("cmb"); dia.append(False)
        elif i < n_pos + n_neg:
            p = noise + (0.4 * _tube(rng) if i % 2 else 0)
            patches.append(p); masks.append(np.zeros((S, S, S), np.uint8))
            labels.append("vessel" if i % 2 else "other"); dia.append(False)
        else:
            patches.append(noise - 0.8 * _sphere(3)); masks.append(np.zeros((S, S, S), np.uint8))
            labels.append("calcification"); dia.append(True)
    patches = np.stack(patches)
    cubes = np.clip(patches[:, 13:20, 13:20, 13:20], 0, None) * 2
    arrays = {"patches": patches.astype(np.float16), "masks": np.stack(masks), "cubes": cubes.astype(np.float16),
              "labels": np.array(labels, dtype="<U16"), "diamagnetic": np.array(dia)}
    write_shard({"arrays": arrays, "meta": {"subject_id": sid, "seed": seed, "voxel_mm": [1.0, 1.0, 1.0]}}, folder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    tr, va = str(root / "train"), str(root / "val")
    _shard(tr, "t0", 1, 8, 8)
    _shard(tr, "t1", 2, 8, 8)
    _shard(va, "v0", 3, 6, 10)
    return tr, va


def test_metrics_on_known_numbers():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert roc_auc(y, s) == pytest.approx(8 / 9)
    assert roc_auc(y, -s) == pytest.approx(1 / 9)
    assert threshold_for_sensitivity(y, s, 0.99) == pytest.approx(0.35)
    assert threshold_for_sensitivity(y, s, 0.6) == pytest.approx(0.8)
    m = sens_spec(y, s, 0.35)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 0, 2, 1)
    # J = 2/3 at both 0.35 (sens 1, spec 2/3) and 0.8 (sens 2/3, spec 1): the lower one wins
    assert youden_threshold(y, s) == pytest.approx(0.35)
    assert youden_threshold(y, s + (y == 1) * 0.5) == pytest.approx(0.85)
    assert np.allclose(normalise_patches(np.array([-5.0, 0.5, 7.0])), [-3.0, 0.5, 3.0])


def test_operating_point_counts_per_subject_within_budget():
    labels = np.array(["cmb", "cmb", "cmb", "cmb_duplicate", "other", "vessel", "other", "other"])
    prob = np.array([0.9, 0.8, 0.3, 0.95, 0.85, 0.7, 0.2, 0.1])
    # 2 subjects, budget 0.5 FP/subject -> at most 1 FP: down to 0.8 two bleeds and the 0.85 FP,
    # 0.7 adds a 2nd FP. Any threshold in (0.7, 0.8] gives 2 TP / 1 FP: the log-odds midpoint is taken
    op = operating_point(labels, prob, n_subjects=2, fp_budget=0.5)
    mid = 1 / (1 + np.exp(-0.5 * (np.log(0.7 / 0.3) + np.log(0.8 / 0.2))))
    assert op["threshold"] == pytest.approx(mid) and 0.7 < op["threshold"] < 0.8
    assert (op["tp"], op["fp"], op["fn"]) == (2, 1, 1) and op["interval"] == [0.7, 0.8]
    assert op["sensitivity"] == pytest.approx(2 / 3) and op["fp_per_subject"] == 0.5
    # a larger budget reaches the third bleed (0.3) and stops before the 0.2 FP; the duplicate
    # counts as neither TP nor FP
    op = operating_point(labels, prob, n_subjects=2, fp_budget=1.0)
    assert 0.2 < op["threshold"] < 0.3 and (op["tp"], op["fp"]) == (3, 2)
    # every candidate within the budget: the interval ends at the lowest score; its midpoint
    # (0.18) admits the 0.2 negative, which the budget allows
    op = operating_point(labels, prob, n_subjects=2, fp_budget=5.0)
    assert op["interval"] == [0.1, 0.3] and 0.1 < op["threshold"] < 0.2 and (op["tp"], op["fp"]) == (3, 3)
    # even the most confident negative breaks a zero budget when it outranks every bleed
    op = operating_point(labels, np.where(labels == "other", 0.99, prob), n_subjects=2, fp_budget=0.0)
    assert (op["tp"], op["fp"]) == (0, 0) and op["threshold"] > 0.99
    # a candidate the ConvScreen dropped is a miss whatever its probability
    screen = np.array([True, False, True, True, True, True, True, True])
    op = operating_point(labels, prob, n_subjects=2, fp_budget=0.5, screen=screen)
    assert (op["tp"], op["fn"]) == (1, 2)
    # the mean of two networks wins when it separates better than either
    v = np.array([0.9, 0.4, 0.6, 0.9, 0.7, 0.1, 0.1, 0.1])
    r = np.array([0.4, 0.9, 0.6, 0.9, 0.1, 0.7, 0.1, 0.1])
    dec = choose_decision(labels, {"vnet": v, "resnet": r}, n_subjects=2, fp_budget=0.0)
    assert dec["rule"] == "mean" and dec["validation"]["mean"]["tp"] == 3
    assert dec["validation"]["vnet"]["tp"] == 1 and dec["validation"]["resnet"]["tp"] == 1


def test_load_shards_excludes_diamagnetic(shards):
    d = load_shards([shards[0]])
    assert len(d["y"]) == 32 and d["y"].sum() == 16
    assert "calcification" not in set(d["labels"])
    assert [m["seed"] for m in d["meta"]] == [1, 2]


def test_augment_keeps_patch_and_mask_aligned():
    rng = np.random.default_rng(0)
    mask = np.zeros((S, S, S), np.uint8)
    mask[3:9, 20:23, 5:15] = 1  # asymmetric block: any flip / rotation moves it
    mask[25, 2, 30] = 1
    patch = mask * rng.uniform(0.5, 1.0, mask.shape).astype(np.float32)
    moved = 0
    for seed in range(6):
        aug = PatchAugmenter(seed=seed, noise_prob=0.0)
        for _ in range(3):
            p, m = aug(patch, mask)
            assert m.sum() == mask.sum()
            assert np.array_equal(m > 0, p != 0)  # intensity scaled, geometry shared
            moved += not np.array_equal(m, mask)
    assert moved >= 12
    a, b = PatchAugmenter(seed=4), PatchAugmenter(seed=4)
    for _ in range(3):
        pa, ma = a(patch, mask)
        pb, mb = b(patch, mask)
        assert np.array_equal(pa, pb) and np.array_equal(ma, mb)


def test_saved_vnet_weights_reload_identically(tmp_path):
    torch.manual_seed(0)
    model = VNet()
    model.train()
    with torch.no_grad():  # move the batch-norm running statistics away from their defaults
        for _ in range(2):
            model(torch.randn(2, 1, S, S, S) * 0.5 + 0.1)
    path = str(tmp_path / "vnet.pt")
    torch.save(model.state_dict(), path)
    again = VNet()
    again.load_state_dict(torch.load(path))
    x = torch.from_numpy(normalise_patches(np.random.default_rng(1).normal(0, 0.5, (3, S, S, S))))[:, None]
    model.eval(); again.eval()
    with torch.no_grad():
        s1, c1 = model(x)
        s2, c2 = again(x)
        s0, _ = VNet().eval()(x)
    assert torch.equal(s1, s2) and torch.equal(c1, c2)
    assert not torch.equal(s0, s1)
    assert os.path.getsize(path) < 3_000_000  # float32 state_dict, ~2.5 MB


@pytest.mark.slow  # 20-120 s on 2 cores depending on load (trains all three networks for 2 epochs)
def test_train_cli_learns_and_writes_models(shards, tmp_path):
    tr, va = shards
    out = str(tmp_path / "models")
    rc = main(["--data", tr, "--val", va, "--out", out, "--model", "all", "--epochs", "2", "--batch", "8",
               "--neg-ratio", "1", "--seed", "0", "--threads", "2", "--conv-epochs", "60"])
    assert rc == 0
    for f in ("vnet.pt", "resnet.pt", "convscreen.pt", "detector.json", "training_log.json", "MODEL_CARD.md"):
        assert os.path.exists(os.path.join(out, f)), f
    det = json.load(open(os.path.join(out, "detector.json")))
    assert det["patch_size"] == 32 and det["normalisation"]["clip_ppm"] == [-3.0, 3.0]
    for k in ("convscreen", "vnet", "resnet"):
        assert 0.0 <= det[k]["threshold"] <= 1.0
        assert set(det["weights"][f"{k}.pt"]) == {"sha256"}
    assert det["convscreen"]["train"]["sensitivity"] >= 0.99
    assert det["vnet"]["val_all"]["auc"] > 0.9
    card = open(os.path.join(out, "MODEL_CARD.md")).read()
    assert "SIMULATED" in card and det["weights"]["vnet.pt"]["sha256"] in card
    log = json.load(open(os.path.join(out, "training_log.json")))
    assert len(log["vnet"]["log"]) == 2 and np.isfinite(log["vnet"]["log"][-1]["val_loss"])
    # the saved weights + the recorded normalisation reproduce the recorded validation AUC
    net = VNet()
    net.load_state_dict(torch.load(os.path.join(out, "vnet.pt")))
    va_d = load_shards([va])
    prob = predict(net, "vnet", va_d["patches"])
    assert roc_auc(va_d["y"], prob) == pytest.approx(det["vnet"]["val_all"]["auc"])
    assert sens_spec(va_d["y"], prob, det["vnet"]["threshold"])["sensitivity"] == pytest.approx(
        det["vnet"]["val_all"]["sensitivity"])
    # the operating point is in detector.json and the product's detector reads it
    dec = det["decision"]
    assert dec["rule"] in dec["validation"] and dec["threshold"] == dec["validation"][dec["rule"]]["threshold"]
    assert all(v["fp_per_subject"] <= 0.35 for v in dec["validation"].values())
    cfg = CMBDetector.load(out).config
    assert cfg.decision_rule == dec["rule"] and cfg.threshold == pytest.approx(dec["threshold"])
    # --model decision re-chooses it with the trained networks: same validation set -> same point,
    # weights untouched, the subjects it was chosen on recorded; a stricter budget never admits more FP
    rc = main(["--data", tr, "--val", va, "--out", out, "--model", "decision", "--threads", "2"])
    again = json.load(open(os.path.join(out, "detector.json")))
    assert rc == 0 and again["weights"] == det["weights"]
    assert again["decision"]["rule"] == dec["rule"]
    assert again["decision"]["threshold"] == pytest.approx(dec["threshold"], rel=1e-5)
    assert again["decision"]["validation_subjects"] == ["v0"]
    assert main(["--data", tr, "--val", va, "--out", out, "--model", "decision", "--fp-budget", "0"]) == 0
    strict = json.load(open(os.path.join(out, "detector.json")))["decision"]
    assert all(v["fp"] == 0 for v in strict["validation"].values())
    assert "Re-chosen" in open(os.path.join(out, "MODEL_CARD.md")).read()
