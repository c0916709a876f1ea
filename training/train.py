"""Stage II training (issue 4): the ConvScreen, the V-Net and the ResNet comparator on candidate shards.

Reference: Xia et al. 2023 (JMRI), sections "V-Net and ResNet Models" and "Data Augmentation Using
CycleGAN"; architectures in ``core.detect.vnet``, ``core.detect.resnet``, ``core.detect.candidates``.

Input: shard folders written by ``python -m training.dataset`` (``<subject>.npz`` + ``.json``).
Output (``--out``): ``convscreen.pt``, ``vnet.pt``, ``resnet.pt`` (float32 state_dicts),
``detector.json`` (thresholds and the exact pre-processing inference must repeat) and
``training_log.json`` (loss and AUC per epoch, timings) and ``MODEL_CARD.md`` (generated from both).

Decisions (documented in ``models/MODEL_CARD.md`` too):

* **Which candidates.** Only paramagnetic candidates are used: diamagnetic ones are never CMBs
  (the product reports them as calcification mimics), so they never reach stage II.
* **Labels.** Positive = ``cmb`` and ``cmb_duplicate``. A duplicate is by construction a
  paramagnetic candidate whose centre lies within the hit distance (DESIGN.md section 7:
  ``max(3 mm, r + 1.5 mm)``) of a microbleed that another candidate already matched; its patch
  holds that bleed within a few voxels of the centre and its mask is filled, so calling it negative
  would teach the V-Net to ignore a real bleed. One-to-one counting of detections is the job of the
  evaluation (and of non-maximum merging at inference), not of the classifier. Everything else
  (``other``, ``vessel``, paramagnetic ``calcification``) is negative.
* **Normalisation** (:func:`normalise_patches`, identical at inference): chi in ppm, clipped to
  +-``CLIP_PPM`` (3 ppm) and divided by ``SCALE_PPM`` (1 ppm); no per-patch standardisation,
  because the absolute susceptibility of a bleed is what separates it from weak mimics.
  ConvScreen input (:func:`conv_inputs`): the 7x7x7 FRST cube binarised at 0.5 of its own
  maximum (``core.detect.candidates.cube_shapes``, the paper's reading), or with
  ``--conv-input frst`` the raw cube clipped to [0, 4].
* **V-Net readout.** The CMB logit is the maximum of the segmentation logits over the central
  7x7x7 voxels (:func:`vnet_readout`, ``--readout 3``), not the paper's global max over the
  32^3 patch (``--readout -1``): patches often hold other bright structures, so the global max
  answers "a bleed anywhere in the patch?" (see :func:`vnet_readout` for the measurements).
  Inference must use the same readout (``detector.json`` records it).
* **Class balance.** Each epoch takes every positive and a fresh random draw of
  ``--neg-ratio`` x as many negatives (all negatives are seen over the epochs); the classification
  cross-entropy weights positives by the sampled negative/positive ratio, the segmentation
  cross-entropy weights lesion voxels by the background/lesion voxel ratio of the training
  positives, capped at ``SEG_WEIGHT_CAP`` (an uncapped ratio of ~1000 makes every voxel positive;
  Dice already handles the imbalance). This is the paper's weighted CE + weighted CE + Dice loss
  (``core.detect.vnet.vnet_loss``).
* **Optimiser.** Adam. The paper uses lr 1e-4 for 150 epochs of batch 100 on a GPU (13 h); on a
  2-core CPU one V-Net step on 16 patches takes ~6 s, so we default to lr 1e-3 and tens of epochs
  with early stopping on validation AUC (best epoch's weights are kept).
* **Thresholds.** ConvScreen: the highest threshold that keeps >= 99 % of the training positives.
  V-Net and ResNet: probability threshold maximising Youden's J on the validation set (also stored:
  the threshold for >= 95 % validation sensitivity).
* **Decision (operating point).** What the product reports is chosen on the validation subjects
  as a clinical operating point, not by Youden's J (which weighs a false positive among ~100
  candidates per subject as little as a missed bleed): for each rule of
  ``core.detect.detector.DECISION_RULES`` (V-Net, ResNet, mean of both) the threshold with the
  highest validation sensitivity whose false positives per subject stay within ``--fp-budget``
  (default 0.25, half the product's goal of 0.5, to leave room for cohort variance: a 0.35 budget
  met on 16 validation subjects (0.31) became 0.56 on a 25-subject held-out cohort), placed at the
  log-odds midpoint of the thresholds that give that result (:func:`operating_point`); the rule
  with the highest sensitivity wins (ties: fewer false positives). Counted per validation
  subject after the ConvScreen: TP = ``cmb`` candidates at or above the threshold (a ``cmb``
  candidate lost by the screen is a miss), FP = negatives at or above it; ``cmb_duplicate``
  candidates count as neither (inference merges them into their bleed). Written to
  ``detector.json`` as ``decision``. ``--model decision`` re-chooses it with the networks already
  in ``--out`` (no training) on the ``--val`` folders given, e.g. a validation set larger than the
  one early stopping used: with 8 validation subjects a 0.35 budget allows 2 false positives in
  all, so the chosen threshold is a noisy estimate.

CLI::

    python -m training.train --data DIR [DIR ...] --val DIR [DIR ...] --out models/
        [--model vnet|resnet|convscreen|all|decision] [--epochs N] [--batch B] [--seed S] [--threads 2]
        [--lr 1e-3] [--neg-ratio 3] [--patience 5] [--val-max-neg 400] [--conv-input shape|frst]
        [--readout 3] [--fp-budget 0.25] [--cyclegan CKPT --synthetic N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from core.detect.candidates import ConvScreen
from core.detect.detector import conv_input
from core.detect.detector import vnet_readout as detector_vnet_readout
from core.detect.resnet import ResNet3D
from core.detect.vnet import PATCH_SIZE, VNet, count_parameters, vnet_loss
from training.augment import PatchAugmenter
from training.shards import CLIP_PPM, POSITIVE_LABELS, SCALE_PPM, TrainingError, load_shards, normalise_patches

SEG_WEIGHT_CAP = 20.0
CONV_SENSITIVITY = 0.99
READOUT_RADIUS_VOX = 3


def vnet_readout(seg_logits: torch.Tensor, radius_vox: int | None = READOUT_RADIUS_VOX) -> torch.Tensor:
    """The V-Net readout used at inference (:func:`core.detect.detector.vnet_readout`)."""
    return detector_vnet_readout(seg_logits, radius_vox)


def conv_inputs(cubes: np.ndarray, mode: str = "shape") -> np.ndarray:
    """ConvScreen input [N, 1, 7, 7, 7] (:func:`core.detect.detector.conv_input`): ``shape``
    (cube_shapes at 0.5) or ``frst`` (raw cube clipped to [0, 4])."""
    if mode not in ("shape", "frst"):
        raise TrainingError(f"unknown ConvScreen input mode {mode!r}")
    return conv_input(cubes, mode)


# --------------------------------------------------------------------------- metrics

def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); nan without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(y) > 0.5
    s = np.asarray(score, np.float64)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def threshold_for_sensitivity(y: np.ndarray, score: np.ndarray, sensitivity: float) -> float:
    """Highest threshold t such that the fraction of positives with score >= t is >= ``sensitivity``."""
    pos = np.sort(np.asarray(score, np.float64)[np.asarray(y) > 0.5])
    if len(pos) == 0:
        raise TrainingError("no positives to choose a threshold on")
    k = int(np.floor((1.0 - sensitivity) * len(pos) + 1e-9))
    return float(pos[min(k, len(pos) - 1)])


def youden_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 (among the observed scores)."""
    s = np.asarray(score, np.float64)
    best, best_t = -2.0, 0.5
    for t in np.unique(s):
        m = sens_spec(y, s, t)
        j = m["sensitivity"] + m["specificity"] - 1.0
        if j > best:
            best, best_t = j, float(t)
    return best_t


def sens_spec(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    """Sensitivity, specificity and counts of the rule ``score >= threshold``."""
    y = np.asarray(y) > 0.5
    p = np.asarray(score) >= threshold
    tp, fn = int((p & y).sum()), int((~p & y).sum())
    tn, fp = int((~p & ~y).sum()), int((p & ~y).sum())
    return {"threshold": float(threshold), "sensitivity": tp / max(tp + fn, 1),
            "specificity": tn / max(tn + fp, 1), "tp": tp, "fn": fn, "tn": tn, "fp": fp}


# --------------------------------------------------------------------------- ConvScreen

def train_convscreen(train: dict, val: dict, *, seed: int = 0, epochs: int = 400, lr: float = 0.02,
                     mode: str = "shape") -> tuple[ConvScreen, dict]:
    """Full-batch Adam on the (small) cube set with positive-weighted BCE; keeps the epoch with
    the best validation AUC. Threshold: keeps >= 99 % of the training positives."""
    torch.manual_seed(seed)
    xt = torch.from_numpy(conv_inputs(train["cubes"], mode))
    yt = torch.from_numpy(train["y"])
    xv = torch.from_numpy(conv_inputs(val["cubes"], mode))
    npos = float(yt.sum())
    if npos == 0:
        raise TrainingError("no positive (CMB) candidates in the training shards")
    pw = torch.tensor((len(yt) - npos) / npos)
    model = ConvScreen()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    log, best = [], (-1.0, None, 0)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        loss = F.binary_cross_entropy_with_logits(model(xt), yt, pos_weight=pw)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ep % 10 == 9 or ep == epochs - 1:
            model.eval()
            with torch.no_grad():
                sv = model(xv).numpy()
            auc = roc_auc(val["y"], sv)
            log.append({"epoch": ep + 1, "train_loss": float(loss.detach()), "val_auc": auc})
            if auc > best[0]:
                best = (auc, {k: v.clone() for k, v in model.state_dict().items()}, ep + 1)
    model.load_state_dict(best[1])
    model.eval()
    with torch.no_grad():
        st = torch.sigmoid(model(xt)).numpy()
        sv = torch.sigmoid(model(xv)).numpy()
    thr = threshold_for_sensitivity(train["y"], st, CONV_SENSITIVITY)
    res = {"input": mode, "best_epoch": best[2], "epochs": epochs, "lr": lr,
           "seconds": time.perf_counter() - t0, "threshold": thr,
           "train": {"auc": roc_auc(train["y"], st), **sens_spec(train["y"], st, thr)},
           "val": {"auc": roc_auc(val["y"], sv), **sens_spec(val["y"], sv, thr)},
           "log": log, "parameters": sum(p.numel() for p in model.parameters())}
    return model, res


# --------------------------------------------------------------------------- V-Net / ResNet

def _forward_loss(model: torch.nn.Module, kind: str, x: torch.Tensor, m: torch.Tensor, y: torch.Tensor,
                  pos_weight: float, seg_pos_weight: float,
                  readout: int | None = READOUT_RADIUS_VOX) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "vnet":
        seg, _ = model(x)
        cls = vnet_readout(seg, readout)
        return vnet_loss(seg, cls, m, y, pos_weight, seg_pos_weight), cls
    logit = model(x)
    loss = F.binary_cross_entropy_with_logits(logit, y, pos_weight=torch.tensor(pos_weight))
    return loss, logit


def predict(model: torch.nn.Module, kind: str, patches: np.ndarray, batch: int = 32,
            readout: int | None = READOUT_RADIUS_VOX) -> np.ndarray:
    """CMB probabilities [N] of raw (un-normalised, ppm) patches [N, 32, 32, 32]; ``readout``: see
    :func:`vnet_readout` (V-Net only)."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(patches), batch):
            x = torch.from_numpy(normalise_patches(patches[s:s + batch]))[:, None]
            o = model(x)
            logit = vnet_readout(o[0], readout) if kind == "vnet" else o
            out.append(torch.sigmoid(logit).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def _val_subset(val: dict, max_neg: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 17])
    pos = np.flatnonzero(val["y"] > 0.5)
    neg = np.flatnonzero(val["y"] <= 0.5)
    if len(neg) > max_neg:
        neg = np.sort(rng.choice(neg, max_neg, replace=False))
    return np.concatenate([pos, neg])


def train_patch_model(kind: str, train: dict, val: dict, *, epochs: int = 20, batch: int = 16,
                      lr: float = 1e-3, seed: int = 0, neg_ratio: float = 3.0, patience: int = 5,
                      val_max_neg: int = 400, augment: bool = True,
                      readout: int | None = READOUT_RADIUS_VOX,
                      progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """Train the V-Net (``kind='vnet'``) or the ResNet (``'resnet'``) with early stopping on the
    validation AUC (computed on all validation positives and up to ``val_max_neg`` negatives)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 1])
    aug = PatchAugmenter(seed=seed) if augment else None
    model = VNet() if kind == "vnet" else ResNet3D()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    pos = np.flatnonzero(train["y"] > 0.5)
    neg = np.flatnonzero(train["y"] <= 0.5)
    if len(pos) == 0 or len(neg) == 0:
        raise TrainingError("training data needs both CMB and non-CMB candidates")
    n_neg = int(min(len(neg), max(1, round(neg_ratio * len(pos)))))
    pos_weight = n_neg / len(pos)
    fg = float(train["masks"][pos].sum())
    seg_pw = float(min(SEG_WEIGHT_CAP, (train["masks"][pos].size - fg) / max(fg, 1.0)))
    vidx = _val_subset(val, val_max_neg, seed)
    vx, vm, vy = val["patches"][vidx], val["masks"][vidx], val["y"][vidx]
    log: list[dict] = []
    best = {"auc": -1.0, "loss": np.inf, "state": None, "epoch": 0}
    since = 0
    t_start = time.perf_counter()
    for ep in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        idx = np.concatenate([pos, rng.choice(neg, n_neg, replace=False)])
        rng.shuffle(idx)
        losses = []
        for s in range(0, len(idx), batch):
            b = np.sort(idx[s:s + batch])
            if len(b) < 2:  # batch norm needs > 1 sample
                continue
            p = train["patches"][b].astype(np.float32)
            m = train["masks"][b]
            if aug is not None:
                p, m = aug.batch(p, m)
            x = torch.from_numpy(normalise_patches(p))[:, None]
            mt = torch.from_numpy(m.astype(np.float32))[:, None]
            yt = torch.from_numpy(train["y"][b])
            loss, _ = _forward_loss(model, kind, x, mt, yt, pos_weight, seg_pw, readout)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        t_train = time.perf_counter() - t0
        # validation loss and AUC (no augmentation, running batch-norm statistics)
        model.eval()
        vl, scores = [], []
        with torch.no_grad():
            for s in range(0, len(vidx), 32):
                x = torch.from_numpy(normalise_patches(vx[s:s + 32]))[:, None]
                mt = torch.from_numpy(vm[s:s + 32].astype(np.float32))[:, None]
                yt = torch.from_numpy(vy[s:s + 32])
                loss, logit = _forward_loss(model, kind, x, mt, yt, pos_weight, seg_pw, readout)
                vl.append(float(loss) * len(yt))
                scores.append(torch.sigmoid(logit).numpy())
        vloss = sum(vl) / len(vidx)
        vauc = roc_auc(vy, np.concatenate(scores))
        rec = {"epoch": ep, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_loss": vloss, "val_auc": vauc, "train_seconds": t_train,
               "epoch_seconds": time.perf_counter() - t0, "patches": int(len(idx))}
        log.append(rec)
        if progress:
            print(json.dumps({"model": kind, **{k: (round(v, 4) if isinstance(v, float) else v)
                                                for k, v in rec.items()}}), flush=True)
        key = vauc if np.isfinite(vauc) else -1.0  # no validation positives: select on the loss
        better = key > best["auc"] + 1e-6 or (abs(key - best["auc"]) <= 1e-6 and vloss < best["loss"])
        if better:
            best = {"auc": key, "loss": vloss, "epoch": ep,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            since = 0
        else:
            since += 1
            if since >= patience:
                break
    model.load_state_dict(best["state"])
    res = {"kind": kind, "epochs_run": len(log), "best_epoch": best["epoch"], "lr": lr, "batch": batch,
           "neg_ratio": neg_ratio, "pos_weight": pos_weight, "seg_pos_weight": seg_pw,
           "augment": augment, "readout_radius_vox": readout, "seconds": time.perf_counter() - t_start, "log": log,
           "parameters": count_parameters(model), "val_subset": {"positives": int(vy.sum()),
                                                                 "negatives": int(len(vy) - vy.sum())}}
    return model, res


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-7), 1.0 - 1e-7)
    return float(np.log(p / (1.0 - p)))


def operating_point(labels: np.ndarray, prob: np.ndarray, n_subjects: int, fp_budget: float,
                    screen: np.ndarray | None = None) -> dict:
    """The threshold with the highest sensitivity whose false positives per subject stay within
    ``fp_budget`` (see "Decision" in the module docstring).

    Thresholds at the scores of the validation candidates from the top down give the best
    true-positive count ``tp``; every threshold in ``(below, top]`` gives it within the budget,
    ``top`` being the score of the lowest-scoring bleed counted and ``below`` the score of the
    first candidate the budget excludes (or the lowest score). The threshold returned is the
    midpoint of that interval in log-odds: as far from the counted bleed as from the excluded
    candidate, instead of at either edge, where one candidate's score on another cohort flips it.
    Returns threshold, sensitivity, fp_per_subject, tp, fn, fp (at the returned threshold) and
    ``interval`` [below, top]."""
    labels = np.asarray(labels).astype(str)
    prob = np.asarray(prob, dtype=np.float64)
    passed = np.ones(len(prob), bool) if screen is None else np.asarray(screen, bool)
    pos = labels == "cmb"
    neg = ~np.isin(labels, POSITIVE_LABELS)
    n_pos = int(pos.sum())
    if n_pos == 0 or n_subjects <= 0:
        raise TrainingError("no validation microbleeds to choose an operating point on")
    counted = passed & (pos | neg)
    scores = np.unique(prob[counted])[::-1]
    best_tp, top, below = -1, None, None
    for t in scores:
        tp = int(np.sum(pos & counted & (prob >= t)))
        fp = int(np.sum(neg & counted & (prob >= t)))
        if fp / n_subjects > fp_budget:
            below = float(t)
            break  # lower thresholds only add false positives
        if tp > best_tp:
            best_tp, top = tp, float(t)
        below = float(t)  # the lowest score within the budget so far
    if top is None:  # even the most confident negative exceeds the budget
        threshold = float(np.nextafter(prob.max(), np.inf))
        below = top = threshold
    else:
        threshold = top if below >= top else 1.0 / (1.0 + np.exp(-0.5 * (_logit(below) + _logit(top))))
        threshold = float(min(max(threshold, np.nextafter(below, np.inf)), top))
    tp = int(np.sum(pos & counted & (prob >= threshold)))
    fp = int(np.sum(neg & counted & (prob >= threshold)))
    return {"threshold": threshold, "tp": tp, "fp": fp, "fn": n_pos - tp, "sensitivity": tp / n_pos,
            "fp_per_subject": fp / n_subjects, "n_subjects": int(n_subjects), "fp_budget": float(fp_budget),
            "interval": [below, top]}


def choose_decision(labels: np.ndarray, probs: dict[str, np.ndarray], n_subjects: int, fp_budget: float,
                    screen: np.ndarray | None = None) -> dict:
    """Operating point of each decision rule on validation; the most sensitive rule wins."""
    from core.detect.detector import DECISION_RULES, decision_probability

    per_rule = {}
    for rule in DECISION_RULES:
        if rule != "vnet" and "resnet" not in probs:
            continue
        p = decision_probability(rule, probs["vnet"], probs.get("resnet"))
        per_rule[rule] = operating_point(labels, p, n_subjects, fp_budget, screen)
    rule = max(per_rule, key=lambda r: (per_rule[r]["sensitivity"], -per_rule[r]["fp_per_subject"]))
    return {"rule": rule, "threshold": per_rule[rule]["threshold"],
            "chosen_on": f"validation subjects after the ConvScreen: highest sensitivity with <= {fp_budget} "
                         "FP/subject, most sensitive rule (training.train.choose_decision)",
            "validation": per_rule}


def evaluate_scores(y: np.ndarray, prob: np.ndarray, threshold: float) -> dict:
    return {"auc": roc_auc(y, prob), **sens_spec(y, prob, threshold), "n": int(len(y)),
            "positives": int(np.sum(y > 0.5))}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        h.update(fh.read())
    return h.hexdigest()


def _subset(d: dict, keep: np.ndarray) -> dict:
    return {k: (v[keep] if isinstance(v, np.ndarray) else v) for k, v in d.items()}


# --------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="training shard folders")
    ap.add_argument("--val", nargs="+", required=True, help="validation shard folders")
    ap.add_argument("--out", default="models")
    ap.add_argument("--model", choices=("vnet", "resnet", "convscreen", "all", "decision"), default="all",
                    help="what to train; 'decision': only re-choose the operating point on --val with the "
                         "networks already in --out")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--neg-ratio", type=float, default=3.0)
    ap.add_argument("--patience", type=int, default=5)
    ap.add_argument("--val-max-neg", type=int, default=400)
    ap.add_argument("--conv-input", choices=("shape", "frst"), default="frst")
    ap.add_argument("--conv-epochs", type=int, default=400)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--readout", type=int, default=READOUT_RADIUS_VOX,
                    help="V-Net CMB logit = max of the segmentation logits within this many voxels of the "
                         "centre (-1: the paper's global max over the patch)")
    ap.add_argument("--fp-budget", type=float, default=0.25,
                    help="false positives per validation subject allowed at the operating point")
    ap.add_argument("--cyclegan", default=None, help="CycleGAN checkpoint (python -m training.cyclegan)")
    ap.add_argument("--synthetic", type=int, default=0, help="synthetic CMB patches to add (with --cyclegan)")
    a = ap.parse_args(argv)
    readout = None if a.readout < 0 else a.readout
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    t0 = time.perf_counter()
    if a.model == "decision":
        return rechoose_decision(a.out, load_shards(a.val), a.fp_budget, argv)
    train, val = load_shards(a.data), load_shards(a.val)
    print(json.dumps({"train_candidates": int(len(train["y"])), "train_positives": int(train["y"].sum()),
                      "val_candidates": int(len(val["y"])), "val_positives": int(val["y"].sum())}), flush=True)
    synth_info = None
    if a.cyclegan and a.synthetic > 0:
        from training.cyclegan import synthesise_from_shards
        train, synth_info = synthesise_from_shards(a.cyclegan, train, a.synthetic, seed=a.seed)
    det_path = os.path.join(a.out, "detector.json")
    log_path = os.path.join(a.out, "training_log.json")
    detector = json.load(open(det_path)) if os.path.exists(det_path) else {}
    tlog = json.load(open(log_path)) if os.path.exists(log_path) else {}
    import monai
    detector.update({
        "patch_size": PATCH_SIZE,
        "normalisation": {"quantity": "chi_ppm", "clip_ppm": [-CLIP_PPM, CLIP_PPM], "scale_ppm": SCALE_PPM,
                          "formula": "x = clip(chi_ppm, -clip, clip) / scale",
                          "function": "core.detect.detector.normalise_patch"},
        "candidates": "paramagnetic only (diamagnetic candidates are calcification mimics, never CMB)",
        "positive_labels": list(POSITIVE_LABELS),
        "versions": {"torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
                     "python": sys.version.split()[0]},
        "training": {"command": "python -m training.train " + " ".join(sys.argv[1:] if argv is None else argv),
                     "seed": a.seed, "train_subjects": train["meta"], "val_subjects": val["meta"],
                     "synthetic": synth_info},
    })
    weights = dict(detector.get("weights", {}))
    which = ("convscreen", "vnet", "resnet") if a.model == "all" else (a.model,)
    if "convscreen" in which:
        model, res = train_convscreen(train, val, seed=a.seed, epochs=a.conv_epochs, mode=a.conv_input)
        path = os.path.join(a.out, "convscreen.pt")
        torch.save(model.state_dict(), path)
        weights["convscreen.pt"] = _sha256(path)
        detector["convscreen"] = {"threshold": res["threshold"], "input": a.conv_input,
                                  "cube_size": 7, "rule": "sigmoid(logit) >= threshold keeps the candidate",
                                  "chosen_on": f"training positives, sensitivity >= {CONV_SENSITIVITY}",
                                  "val": res["val"], "train": res["train"]}
        tlog["convscreen"] = res
        print(json.dumps({"convscreen": {"threshold": res["threshold"], "train": res["train"], "val": res["val"]}}),
              flush=True)
    screen = convscreen_passes(a.out, detector, val)
    val_probs: dict[str, np.ndarray] = {}
    for kind in ("vnet", "resnet"):
        if kind not in which:
            continue
        model, res = train_patch_model(kind, train, val, epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed,
                                       neg_ratio=a.neg_ratio, patience=a.patience, val_max_neg=a.val_max_neg,
                                       augment=not a.no_augment, readout=readout)
        path = os.path.join(a.out, f"{kind}.pt")
        torch.save(model.state_dict(), path)
        weights[f"{kind}.pt"] = _sha256(path)
        t = time.perf_counter()
        prob = predict(model, kind, val["patches"], readout=readout)
        val_probs[kind] = prob
        res["val_full_predict_seconds"] = time.perf_counter() - t
        thr = youden_threshold(val["y"], prob)
        thr95 = threshold_for_sensitivity(val["y"], prob, 0.95)
        entry = {"threshold": thr, "threshold_rule": "max Youden J on validation (all paramagnetic candidates)",
                 "threshold_sens95": thr95, "val_all": evaluate_scores(val["y"], prob, thr),
                 "val_all_at_sens95": evaluate_scores(val["y"], prob, thr95),
                 "readout": ({"rule": "global max of segmentation logits (paper)", "radius_vox": None}
                             if readout is None or kind != "vnet" else
                             {"rule": "max of segmentation logits over the central (2r+1)^3 voxels",
                              "radius_vox": readout, "function": "core.detect.detector.vnet_readout"}),
                 "best_epoch": res["best_epoch"], "epochs_run": res["epochs_run"],
                 "parameters": res["parameters"]}
        if screen is not None:
            entry["val_after_convscreen"] = evaluate_scores(val["y"][screen], prob[screen], thr)
            entry["val_after_convscreen"]["positives_lost_by_screen"] = int(np.sum(val["y"][~screen] > 0.5))
        detector[kind] = entry
        tlog[kind] = res
        print(json.dumps({kind: {k: v for k, v in entry.items() if k != "parameters"}}), flush=True)
    if "vnet" in val_probs:
        detector["decision"] = choose_decision(val["labels"], val_probs, len(val["meta"]), a.fp_budget, screen)
        print(json.dumps({"decision": detector["decision"]}), flush=True)
    detector["weights"] = {k: {"sha256": v} if isinstance(v, str) else v for k, v in weights.items()}
    detector["total_seconds"] = time.perf_counter() - t0
    tlog["threads"] = a.threads
    with open(det_path, "w") as fh:
        json.dump(detector, fh, indent=1)
    with open(log_path, "w") as fh:
        json.dump(tlog, fh, indent=1)
    write_model_card(a.out, machine=f"Trained with {a.threads} CPU threads ({os.cpu_count()} cores on the machine).")
    return 0



def convscreen_passes(out: str, detector: dict, val: dict) -> np.ndarray | None:
    """Which of ``val``'s candidates the ConvScreen saved in ``out`` keeps (None: no screen there)."""
    path = os.path.join(out, "convscreen.pt")
    if "convscreen" not in detector or not os.path.exists(path):
        return None
    cs = ConvScreen()
    cs.load_state_dict(torch.load(path))
    cs.eval()
    with torch.no_grad():
        pv = torch.sigmoid(cs(torch.from_numpy(conv_inputs(val["cubes"], detector["convscreen"]["input"])))).numpy()
    return pv >= detector["convscreen"]["threshold"]


def rechoose_decision(out: str, val: dict, fp_budget: float, argv: Sequence[str] | None) -> int:
    """``--model decision``: the operating point of :func:`choose_decision` on ``val`` with the
    ConvScreen, V-Net and ResNet already trained in ``out`` (same readout); rewrites
    ``detector.json`` ``decision`` (with the validation subjects it was chosen on) and the card."""
    det_path = os.path.join(out, "detector.json")
    detector = json.load(open(det_path)) if os.path.exists(det_path) else {}
    if "vnet" not in detector:
        raise TrainingError(f"{out} has no trained V-Net (detector.json); train first")
    readout = (detector["vnet"].get("readout") or {}).get("radius_vox")
    screen = convscreen_passes(out, detector, val)
    probs = {}
    for kind in ("vnet", "resnet"):
        path = os.path.join(out, f"{kind}.pt")
        if kind in detector and os.path.exists(path):
            model = VNet() if kind == "vnet" else ResNet3D()
            model.load_state_dict(torch.load(path))
            probs[kind] = predict(model, kind, val["patches"], readout=readout if kind == "vnet" else None)
    decision = choose_decision(val["labels"], probs, len(val["meta"]), fp_budget, screen)
    decision["validation_subjects"] = [m["subject"] for m in val["meta"]]
    decision["command"] = "python -m training.train " + " ".join(sys.argv[1:] if argv is None else argv)
    detector["decision"] = decision
    with open(det_path, "w") as fh:
        json.dump(detector, fh, indent=1)
    print(json.dumps({"decision": decision}), flush=True)
    threads = json.load(open(os.path.join(out, "training_log.json"))).get("threads")
    write_model_card(out, machine=f"Trained with {threads} CPU threads ({os.cpu_count()} cores on the machine).")
    return 0


# --------------------------------------------------------------------------- model card

def _fmt(x: object, nd: int = 3) -> str:
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def write_model_card(out_dir: str, machine: str = "") -> str:
    """(Re)write ``out_dir/MODEL_CARD.md`` from ``detector.json`` and ``training_log.json``."""
    det = json.load(open(os.path.join(out_dir, "detector.json")))
    log = json.load(open(os.path.join(out_dir, "training_log.json")))
    tr = det["training"]
    lines = ["# Model card: stage II CMB detector (ConvScreen, V-Net, ResNet comparator)", "",
             "**All training and validation data are SIMULATED** (digital brains from "
             "`training.sim`, QSM reconstructed by our chain, candidates from stage I; "
             "`python -m training.dataset`). No figure here is a clinical performance claim.", "",
             "## Data", "",
             "| set | subject | seed | voxel (mm) | control | paramagnetic candidates | positives |",
             "|---|---|---|---|---|---|---|"]
    for name, key in (("train", "train_subjects"), ("val", "val_subjects")):
        for m in tr[key]:
            lines.append(f"| {name} | {m['subject']} | {m['seed']} | {m['voxel_mm']} | {m['control']} | "
                         f"{m['candidates_used']} | {m['positives']} |")
    for name, key in (("train", "train_subjects"), ("val", "val_subjects")):
        n = sum(m["candidates_used"] for m in tr[key])
        p = sum(m["positives"] for m in tr[key])
        lines.append(f"\n{name}: {len(tr[key])} subjects, {n} paramagnetic candidates, {p} positives "
                     f"(`cmb` + `cmb_duplicate`), {n - p} negatives.")
    if tr.get("synthetic"):
        lines.append(f"\nCycleGAN synthetic positives: {tr['synthetic']}")
    lines += ["", "Labels: positive = `cmb` or `cmb_duplicate` (a second candidate within the hit distance "
              "of an already matched bleed: its patch holds the bleed); negative = `other`, `vessel`, "
              "paramagnetic `calcification`. Diamagnetic candidates are excluded (never CMB; reported as "
              "calcification mimics).", "",
              "## Recipe", "",
              "- ConvScreen (`core.detect.candidates.ConvScreen`, "
              f"{log.get('convscreen', {}).get('parameters', '?')} parameters): input "
              f"`{det.get('convscreen', {}).get('input', '?')}` 7x7x7 FRST cube "
              "(`training.train.conv_inputs`), full-batch Adam lr 0.02, positive-weighted BCE, best "
              "validation-AUC epoch kept; threshold = highest keeping >= 99 % of training positives.",
              "- V-Net (`core.detect.vnet.VNet`, 611,265 parameters in the paper's count) and ResNet "
              "(`core.detect.resnet.ResNet3D`, 452,529): 32^3 QSM patches, normalisation "
              f"`{det['normalisation']['formula']}` with clip {det['normalisation']['clip_ppm']} ppm, "
              f"scale {det['normalisation']['scale_ppm']} ppm.",
              "- V-Net loss: `core.detect.vnet.vnet_loss` = weighted BCE (classification) + weighted BCE "
              "+ Dice (segmentation). V-Net CMB logit: max of the segmentation logits over the central "
              "7^3 voxels (`training.train.vnet_readout`; the paper's global max is `--readout -1`). "
              "ResNet: weighted BCE.",
              "- Adam; every epoch all positives + a fresh draw of negatives (neg-ratio x positives); "
              "augmentation `training.augment.PatchAugmenter` (flips on 3 axes, quarter turns in the "
              "(i, j) plane, intensity scale +-20 %, Gaussian noise 0.02 ppm; MONAI); early stopping "
              "on validation AUC, best epoch kept.",
              "- Why lr 1e-3 and not the paper's 1e-4: the paper trained 150 epochs of batch 100 for 13 h on a "
              "GPU; here the whole training must fit ~60 min of a 2-core CPU (measured: ~0.08 s per V-Net "
              "training patch on idle cores, 0.3-0.5 s with the cores shared), i.e. a few hundred Adam steps.",
              "- ConvScreen input, measured on the dev shards (ds8+ds10 train, ds9 val): binary cube shapes "
              "(paper reading) overfit (train AUC 0.97, val AUC 0.77, val sensitivity 0.69 at the 99 %-train "
              "threshold); the raw FRST cube generalised (val AUC 0.90, sensitivity 0.98), hence `frst`.",
              ""]
    for kind in ("vnet", "resnet"):
        if kind in log:
            r = log[kind]
            ep = r["log"]
            tps = np.mean([e["train_seconds"] / max(e["patches"], 1) for e in ep])
            lines.append(f"- {kind}: lr {r['lr']}, batch {r['batch']}, neg-ratio {r['neg_ratio']}, "
                         f"pos_weight {r['pos_weight']:.2f}, "
                         + (f"seg_pos_weight {_fmt(r['seg_pos_weight'], 1)}, " if kind == "vnet" else "")
                         + f"parameters {r['parameters']}, "
                         f"{r['epochs_run']} epochs run, best epoch {r['best_epoch']}, "
                         f"{np.mean([e['epoch_seconds'] for e in ep]):.0f} s per epoch "
                         f"({tps:.2f} s per training patch), total {r['seconds'] / 60:.1f} min.")
    lines += ["", "Sizing for a final run in <= ~60 min on 2 cores: one V-Net epoch costs about "
              "(1 + neg-ratio) x positives x 0.04-0.08 s (the per-epoch figures above, measured), plus "
              "validation (~0.02 s per patch). Early stopping keeps the best validation-AUC epoch; if the "
              "best epoch is the last one, more epochs would still help.",
              "", "## Reproduce", "", "```", tr["command"], "```", "",
              f"Seed {tr['seed']}; versions {det['versions']}. {machine}", "",
              "## Validation metrics (all paramagnetic candidates of the validation subjects)", "",
              "| model | AUC | threshold | sensitivity | specificity | TP | FN | TN | FP |",
              "|---|---|---|---|---|---|---|---|---|"]
    if "convscreen" in det:
        v = det["convscreen"]["val"]
        lines.append(f"| ConvScreen (thr: 99 % train sens.) | {_fmt(v['auc'])} | {_fmt(v['threshold'])} | "
                     f"{_fmt(v['sensitivity'])} | {_fmt(v['specificity'])} | {v['tp']} | {v['fn']} | {v['tn']} | {v['fp']} |")
    for kind in ("vnet", "resnet"):
        if kind in det:
            for tag, key in (("Youden", "val_all"), ("sens >= 0.95", "val_all_at_sens95")):
                v = det[kind][key]
                lines.append(f"| {kind} ({tag}) | {_fmt(v['auc'])} | {_fmt(v['threshold'])} | "
                             f"{_fmt(v['sensitivity'])} | {_fmt(v['specificity'])} | {v['tp']} | {v['fn']} | "
                             f"{v['tn']} | {v['fp']} |")
            if "val_after_convscreen" in det[kind]:
                v = det[kind]["val_after_convscreen"]
                lines.append(f"| {kind} after ConvScreen (Youden thr.) | {_fmt(v['auc'])} | {_fmt(v['threshold'])} | "
                             f"{_fmt(v['sensitivity'])} | {_fmt(v['specificity'])} | {v['tp']} | {v['fn']} | "
                             f"{v['tn']} | {v['fp']} |")
    if "decision" in det:
        dec = det["decision"]
        lines += ["", "## Operating point (what the product reports)", "",
                  f"Rule **{dec['rule']}** at probability >= {_fmt(dec['threshold'])}; chosen on {dec['chosen_on']}.", "",
                  "| rule | threshold | TP | FN | FP | sensitivity | FP / subject |", "|---|---|---|---|---|---|---|"]
        for rule, v in dec["validation"].items():
            lines.append(f"| {rule} | {_fmt(v['threshold'])} | {v['tp']} | {v['fn']} | {v['fp']} | "
                         f"{_fmt(v['sensitivity'])} | {_fmt(v['fp_per_subject'], 2)} |")
        if "validation_subjects" in dec:
            lines += ["", f"Re-chosen (`{dec['command']}`) on {len(dec['validation_subjects'])} validation "
                      f"subjects: {', '.join(dec['validation_subjects'])}."]
    lines += ["", "Thresholds were chosen on this validation set, so these figures are optimistic; a held-out "
              "test set is the evaluation's job (`training.evaluate`).", "", "## Weights (sha256)", ""]
    for f, h in det.get("weights", {}).items():
        size = os.path.getsize(os.path.join(out_dir, f)) if os.path.exists(os.path.join(out_dir, f)) else 0
        lines.append(f"- `{f}` ({size / 1e3:.1f} kB): `{h['sha256']}`")
    lines += ["", "Files: `detector.json` (thresholds, normalisation, readout, versions, data seeds), "
              "`training_log.json` (loss and AUC per epoch).", ""]
    path = os.path.join(out_dir, "MODEL_CARD.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
