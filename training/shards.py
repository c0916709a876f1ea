"""Stage II training data: the candidate shards written by ``python -m training.dataset`` and the
input normalisation that training, the CycleGAN augmentation and inference share.

``training.train`` and ``training.cyclegan`` both read shards through :func:`load_shards` and
normalise patches with :func:`normalise_patches` (:func:`core.detect.detector.normalise_patch`
with the constants below, which ``detector.json`` records for inference).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import numpy as np

from core.detect.detector import normalise_patch
from core.detect.vnet import PATCH_SIZE

CLIP_PPM = 3.0
SCALE_PPM = 1.0
POSITIVE_LABELS = ("cmb", "cmb_duplicate")


class TrainingError(RuntimeError):
    """Training cannot proceed (no shards, no positives, ...)."""


def load_shards(dirs: Sequence[str], paramagnetic_only: bool = True) -> dict:
    """Concatenate the shards of ``dirs``; keep paramagnetic candidates only (default).

    Returns a dict with ``patches`` float16 [N, 32, 32, 32], ``masks`` uint8, ``cubes`` float16
    [N, 7, 7, 7], ``labels`` (str), ``y`` float32 (1 = CMB or duplicate), ``subject`` (str) and
    ``meta`` (per-subject seed / voxel size / counts from the shard json).
    """
    files = sorted(f for d in dirs for f in glob.glob(os.path.join(d, "*.npz")))
    if not files:
        raise TrainingError(f"no shards (*.npz) in {list(dirs)}")
    parts: dict[str, list] = {k: [] for k in ("patches", "masks", "cubes", "labels", "subject")}
    meta = []
    for f in files:
        z = np.load(f)
        keep = ~z["diamagnetic"].astype(bool) if paramagnetic_only else np.ones(len(z["labels"]), bool)
        if z["patches"].shape[1:] != (PATCH_SIZE,) * 3:
            raise TrainingError(f"{f}: patches {z['patches'].shape[1:]} are not {PATCH_SIZE}^3")
        for k in ("patches", "masks", "cubes", "labels"):
            parts[k].append(z[k][keep])
        sid = os.path.splitext(os.path.basename(f))[0]
        parts["subject"].append(np.array([sid] * int(keep.sum())))
        js = os.path.splitext(f)[0] + ".json"
        m = json.load(open(js)) if os.path.exists(js) else {}
        meta.append({"subject": sid, "folder": os.path.dirname(os.path.abspath(f)), "seed": m.get("seed"),
                     "voxel_mm": [round(float(v), 3) for v in m.get("voxel_mm") or []], "control": m.get("control"),
                     "candidates_used": int(keep.sum()),
                     "positives": int(np.isin(z["labels"][keep], POSITIVE_LABELS).sum())})
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["y"] = np.isin(out["labels"], POSITIVE_LABELS).astype(np.float32)
    out["meta"] = meta
    return out


def normalise_patches(patches: np.ndarray) -> np.ndarray:
    """The stage II input normalisation, i.e. :func:`core.detect.detector.normalise_patch` with
    ``clip(chi, -CLIP_PPM, CLIP_PPM) / SCALE_PPM``. Returns float32 of the same shape."""
    return normalise_patch(patches, SCALE_PPM, CLIP_PPM / SCALE_PPM)
