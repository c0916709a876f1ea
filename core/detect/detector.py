"""The complete microbleed detector of the reference method (Xia et al. 2023, JMRI), from QSM to findings.

    QSM (ppm) --stage I (core.detect.stage1)--> paramagnetic + diamagnetic candidates
      paramagnetic --ConvScreen on 7x7x7 FRST cubes, p >= conv_threshold--> survivors
      survivors --V-Net on 32^3 QSM patches (normalise_patch), p = sigmoid(central seg logit);
                  ResNet on the same patches when the decision rule uses it
                  --decision probability (V-Net p, ResNet p or their mean) >= decision threshold-->
                  microbleeds, each segmented (V-Net sigmoid > 0.5)
      diamagnetic, peak chi < calcification_peak_ppm, FRST >= calcification_frst_min --> calcification mimics (never cmb)
      --> non-maximum suppression, label map without overlaps --> :class:`StudyFindings`

Everything the networks were trained with is read from ``models/detector.json`` (format below) so
training and inference cannot disagree silently; :func:`normalise_patch` and :func:`conv_input` are
the only definitions of the networks' input transforms, and training imports them.

``detector.json`` (every key except ``networks`` optional; defaults in brackets)::

    {
      "format_version": 1,
      "patch_size": 32,                         # V-Net / ResNet patch edge in voxels [32]
      "normalisation": {"scale_ppm": 0.5, "clip": 4.0},   # normalise_patch [0.5, 4.0]
      "conv_input": "shapes",                   # "shapes" (cube_shapes at 0.5) or "raw" FRST cubes
      "conv_threshold": 0.5,                    # on sigmoid(ConvScreen logit) [0.5]
      "vnet_threshold": 0.5,                    # on sigmoid(V-Net cls logit) [0.5]
      "resnet_threshold": 0.5,                  # on sigmoid(ResNet logit), stages only [0.5]
      "decision": {"rule": "mean", "threshold": 0.4},   # DECISION_RULES; threshold [the rule's
                                                # network threshold]; rule [vnet, the paper's]
      "seg_threshold": 0.5,                     # V-Net voxel probability for the segment [0.5]
      "calcification_peak_ppm": -0.2,           # diamagnetic peak below this ... [-0.2]
      "calcification_frst_min": 1.5,            # ... and FRST score at least this -> calcification [1.5]
      "batch_size": 16,                         # patches per forward pass [16]
      "stage1": {"threshold": 0.06, ...},       # any core.detect.stage1.Stage1Params field [defaults]
      "networks": {                             # required: convscreen and vnet; resnet optional
        "convscreen": {"file": "convscreen.pt", "sha256": "<64 hex>", "kwargs": {}},
        "vnet":       {"file": "vnet.pt",       "sha256": "<64 hex>", "kwargs": {}},
        "resnet":     {"file": "resnet.pt",     "sha256": "<64 hex>", "kwargs": {}}
      }
    }

``file`` is relative to the model folder and holds a ``state_dict`` (``torch.save``); ``kwargs``
are the constructor arguments of ``ConvScreen`` / ``VNet`` / ``ResNet3D``. :func:`write_detector_json`
writes this file with the sha256 sums filled in.

What the paper does not give, and our choices:

* **Segment** of a microbleed: the V-Net voxels with sigmoid > ``seg_threshold`` connected (26-)
  to the patch centre (or the component nearest to it), inside the brain mask. When that segment
  is empty or touches the patch border (not a focal lesion: an untrained or confused network), the
  stage I region is used instead: voxels connected to the candidate above half way from the local
  background (median in a 5-7 mm shell) to the peak, within 6 mm (the same rule stage I measures
  its diameter with). Which one was used is recorded per finding in ``DetectionResult.segment_source``.
* **Centre, size**: centroid of the segment (voxel and LPS), volume = voxels x voxel volume,
  diameter of the sphere of that volume, mean chi inside the segment.
* **Duplicates** (non-maximum suppression): a detection whose centroid lies within the hit radius
  ``max(3 mm, r + 1.5 mm)`` (DESIGN.md section 7; r = radius of the stronger one) of a stronger
  detection of the same kind is dropped; so is one whose segment lies entirely in stronger ones'.
* **Paramagnetic check**: a microbleed whose segment has a mean chi <= 0 ppm is dropped (its
  segment lies where QSM is zero or negative: an edge of an unreliable-phase region, not a bleed).
  On the held-out simulated evaluation (25 subjects) none of the 154 reported microbleeds had
  mean chi <= 0, so the check changes no figure there; it guards the untrained and the odd case.
* **Calcification mimics**: stage I's diamagnetic candidates with peak chi below
  ``calcification_peak_ppm`` (-0.2 ppm) **and** a normalised diamagnetic FRST score of at least
  ``calcification_frst_min`` (1.5): a calcification is a compact, strongly radially symmetric dark
  focus; the dark candidates that are not (vein walls, dipole side lobes, streaks, dark deep grey
  texture) are weakly symmetric even when as negative. Chosen on the training shards
  (``training.dataset`` seed 300, models/MODEL_CARD.md: 28 simulated subjects, 1416 diamagnetic
  candidates, 40 calcifications) as the pair maximising calcifications labelled minus false
  labels over peak {-0.15 .. -0.3} x score {0.5 .. 2}: 36/40 with 1 false label. The peak-only rule used before (-0.3 ppm): 34/40
  with 47 false (1.7 per subject). Checked on 16 validation subjects (seeds 400-402):
  26/27 calcifications, 5 false labels (0.3 per subject), against 24/27 and 23 false for the
  peak-only rule. Mimics are only labelled, never counted as microbleeds.
  No network scores them; their ``probability`` is 1.0, meaning "the rule fired", not a calibrated
  probability. Iron mimics (non-haemorrhagic iron) are **not** detected yet: they are paramagnetic
  and would need a trained classifier; nothing here labels a focus ``iron``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from core.detect.candidates import ConvScreen, cube_shapes
from core.detect.handcrafted import component_features, passes_handcrafted
from core.detect.resnet import ResNet3D
from core.detect.stage1 import Candidates, Stage1Params, detect_candidates, half_max_region
from core.detect.vnet import PATCH_SIZE, VNet
from core.errors import ConfigError
from core.findings import Finding, StudyFindings
from core.geometry import Geometry

CONFIG_NAME = "detector.json"
NORM_SCALE_PPM = 0.5
""":func:`normalise_patch` divides chi by this (ppm): microbleeds (0.2-1.5 ppm) map to 0.4-3."""
NORM_CLIP = 4.0
"""... and clips to +-this (i.e. +-2 ppm), so sinus/bone residues do not dominate a patch."""
CALCIFICATION_PEAK_PPM = -0.2
CALCIFICATION_FRST_MIN = 1.5
NETWORK_CLASSES = {"convscreen": ConvScreen, "vnet": VNet, "resnet": ResNet3D}
CONV_INPUT_MODES = ("shapes", "frst", "raw")
READOUT_RADIUS_VOX = 3
"""V-Net readout: maximum of the segmentation logits over the central 7^3 voxels (see vnet_readout)."""
REQUIRED_NETWORKS = ("convscreen", "vnet")
DECISION_RULES = ("vnet", "resnet", "mean")
"""How a ConvScreen survivor becomes a microbleed: the V-Net probability (the paper), the ResNet's,
or the mean of the two (an ensemble; chosen when it does better on validation, see training.train)."""
HANDCRAFTED_REGION_MM = 10.0
"""Radius of the half-maximum region the hand-crafted baseline measures (volume, length, FA): wide
enough that a vein shows its length beyond the 10 mm length limit."""


def decision_probability(rule: str, vnet_p: np.ndarray, resnet_p: np.ndarray | None) -> np.ndarray:
    """The probability compared with the decision threshold under ``rule`` (DECISION_RULES)."""
    if rule == "vnet":
        return np.asarray(vnet_p, dtype=np.float64)
    if resnet_p is None:
        raise ConfigError(f"decision rule {rule!r} needs ResNet probabilities")
    if rule == "resnet":
        return np.asarray(resnet_p, dtype=np.float64)
    return 0.5 * (np.asarray(vnet_p, dtype=np.float64) + np.asarray(resnet_p, dtype=np.float64))


def normalise_patch(chi_patch_ppm: np.ndarray, scale_ppm: float = NORM_SCALE_PPM,
                    clip: float = NORM_CLIP) -> np.ndarray:
    """The networks' input: ``clip(chi / scale_ppm, -clip, clip)`` as float32 (any shape).

    The one definition for training and inference; ``detector.json``'s ``normalisation`` records
    the values a model was trained with.
    """
    x = np.asarray(chi_patch_ppm, dtype=np.float32) / np.float32(scale_ppm)
    return np.clip(x, -clip, clip).astype(np.float32)


def conv_input(cubes: np.ndarray, mode: str = "shapes") -> np.ndarray:
    """ConvScreen input [N, 1, 7, 7, 7] float32 from stage I's FRST cubes [N, 7, 7, 7].

    ``shapes``: :func:`core.detect.candidates.cube_shapes` at 0.5 of each cube's maximum (the
    paper's thresholded cubes); ``frst``: the FRST cubes clipped to [0, 4] (what the shipped
    ConvScreen is trained on: the binarised shapes over-fitted, see models/MODEL_CARD.md);
    ``raw``: the FRST cubes themselves.
    """
    mode = {"shape": "shapes"}.get(mode, mode)
    if mode not in CONV_INPUT_MODES:
        raise ConfigError(f"conv_input must be one of {CONV_INPUT_MODES}, got {mode!r}")
    c = np.asarray(cubes, dtype=np.float32)
    if mode == "shapes":
        c = cube_shapes(c, 0.5)
    elif mode == "frst":
        c = np.clip(c, 0.0, 4.0)
    return c[:, None].astype(np.float32)


def vnet_readout(seg_logits, radius_vox: int | None = READOUT_RADIUS_VOX):
    """CMB logit [N] from V-Net segmentation logits [N, 1, D, H, W] (torch or numpy).

    The maximum over the central ``(2r+1)^3`` voxels, or over the whole patch (the paper's global
    max-pool, ``VNet``'s ``cls_logit``) when ``radius_vox`` is None. The central readout asks "is
    *this candidate* a bleed" rather than "is there a bleed anywhere in the patch": on the dev
    validation shards the global maximum separated CMBs with AUC 0.65, the central 7^3 with 0.92.
    """
    amax = torch.amax if isinstance(seg_logits, torch.Tensor) else np.max
    if radius_vox is None:
        return amax(seg_logits, (1, 2, 3, 4)) if amax is np.max else amax(seg_logits, dim=(1, 2, 3, 4))
    c = [s // 2 for s in seg_logits.shape[2:]]
    r = int(radius_vox)
    sub = seg_logits[:, :, c[0] - r:c[0] + r + 1, c[1] - r:c[1] + r + 1, c[2] - r:c[2] + r + 1]
    return amax(sub, (1, 2, 3, 4)) if amax is np.max else amax(sub, dim=(1, 2, 3, 4))


def extract_patches(volume: np.ndarray, centres: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """[N, size, size, size] crops with each centre voxel at index ``size // 2`` (zero padded);
    the same crop as ``training.dataset._patches``."""
    h = size // 2
    v = np.pad(np.asarray(volume, dtype=np.float32), h)
    c = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    out = np.zeros((len(c), size, size, size), np.float32)
    for m, ci in enumerate(c):
        out[m] = v[ci[0]:ci[0] + size, ci[1]:ci[1] + size, ci[2]:ci[2] + size]
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_detector_json(model_dir: Path, config: dict) -> Path:
    """Write ``model_dir/detector.json`` from ``config`` (format in the module docstring), filling
    in each network's ``sha256`` from its file. Returns the path."""
    model_dir = Path(model_dir)
    cfg = json.loads(json.dumps(config))
    for name, net in cfg.get("networks", {}).items():
        f = model_dir / net["file"]
        if not f.is_file():
            raise ConfigError(f"cannot write {CONFIG_NAME}: the {name} weights {f} do not exist")
        net["sha256"] = file_sha256(f)
    cfg.setdefault("format_version", 1)
    path = model_dir / CONFIG_NAME
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


@dataclass(frozen=True)
class DetectorConfig:
    """Parsed ``detector.json`` (see the module docstring)."""

    networks: dict
    patch_size: int = PATCH_SIZE
    scale_ppm: float = NORM_SCALE_PPM
    clip: float = NORM_CLIP
    conv_input: str = "shapes"
    conv_threshold: float = 0.5
    vnet_threshold: float = 0.5
    resnet_threshold: float = 0.5
    seg_threshold: float = 0.5
    calcification_peak_ppm: float = CALCIFICATION_PEAK_PPM
    calcification_frst_min: float = CALCIFICATION_FRST_MIN
    batch_size: int = 16
    vnet_readout_radius: int | None = None
    stage1: Stage1Params = field(default_factory=Stage1Params)
    decision_rule: str = "vnet"
    decision_threshold: float | None = None  # None: the threshold of the rule's network

    @property
    def threshold(self) -> float:
        """The probability a ConvScreen survivor needs under ``decision_rule`` to be a microbleed."""
        if self.decision_threshold is not None:
            return self.decision_threshold
        return self.resnet_threshold if self.decision_rule == "resnet" else self.vnet_threshold

    def algorithm_parameters(self) -> list[str]:
        """The operating point as ``name=value`` strings, for the SR's Algorithm Parameters
        (TID 4019): stage I threshold, network thresholds, decision rule, segment threshold and
        the first 12 hex digits of each network's sha256."""
        out = [f"stage1_threshold={self.stage1.threshold:g}", f"conv_threshold={self.conv_threshold:g}",
               f"vnet_threshold={self.vnet_threshold:g}", f"decision={self.decision_rule}>={self.threshold:g}",
               f"seg_threshold={self.seg_threshold:g}"]
        return out + [f"{name}_sha256={net['sha256'][:12]}" for name, net in sorted(self.networks.items())]

    @staticmethod
    def _from_training_format(d: dict, source: str) -> dict:
        """Translate what ``training.train`` writes (per-network sections with ``threshold`` and
        ``readout``, ``weights`` with sha256, ``normalisation.clip_ppm``/``scale_ppm``) into the
        keys above. ``clip(chi, -c, c) / s`` equals ``clip(chi / s, -c/s, c/s)``."""
        weights = d.get("weights") or {}
        out = {k: v for k, v in d.items() if k in ("patch_size", "stage1", "seg_threshold",
                                                   "calcification_peak_ppm", "calcification_frst_min",
                                                   "batch_size", "decision")}
        nets = {}
        for name in NETWORK_CLASSES:
            f = f"{name}.pt"
            if name in d and f in weights:
                nets[name] = {"file": f, "sha256": weights[f].get("sha256", ""), "kwargs": {}}
        out["networks"] = nets
        norm = d.get("normalisation") or {}
        clip_ppm = norm.get("clip_ppm", [-NORM_CLIP * NORM_SCALE_PPM, NORM_CLIP * NORM_SCALE_PPM])
        scale = float(norm.get("scale_ppm", NORM_SCALE_PPM))
        out["normalisation"] = {"scale_ppm": scale, "clip": float(max(abs(v) for v in clip_ppm)) / scale}
        conv = d.get("convscreen") or {}
        out["conv_input"] = {"shape": "shapes"}.get(conv.get("input", "shapes"), conv.get("input", "shapes"))
        for name in ("convscreen", "vnet", "resnet"):
            if isinstance(d.get(name), dict) and "threshold" in d[name]:
                out[{"convscreen": "conv"}.get(name, name) + "_threshold"] = d[name]["threshold"]
        readout = (d.get("vnet") or {}).get("readout") or {}
        out["vnet_readout_radius"] = readout.get("radius_vox")
        return out

    @classmethod
    def from_json(cls, d: Any, source: str = CONFIG_NAME) -> "DetectorConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must hold a JSON object")
        if "networks" not in d and "weights" in d:
            d = cls._from_training_format(d, source)
        nets = d.get("networks")
        if not isinstance(nets, dict):
            raise ConfigError(f"{source} has no 'networks' section naming the model files")
        for name in REQUIRED_NETWORKS:
            if name not in nets:
                raise ConfigError(f"{source} does not name the {name} network under 'networks'")
        for name, net in nets.items():
            if name not in NETWORK_CLASSES:
                raise ConfigError(f"{source} names an unknown network {name!r}")
            if not isinstance(net, dict) or not isinstance(net.get("file"), str) \
                    or not isinstance(net.get("sha256"), str):
                raise ConfigError(f"{source}: network {name!r} needs 'file' and 'sha256' strings")
        norm = d.get("normalisation", {}) or {}
        s1 = d.get("stage1", {}) or {}
        known = {f.name for f in fields(Stage1Params)}
        bad = sorted(set(s1) - known)
        if bad:
            raise ConfigError(f"{source}: unknown stage1 settings {bad}")
        s1 = {k: tuple(v) if isinstance(v, list) else v for k, v in s1.items()}
        decision = d.get("decision", {}) or {}
        if not isinstance(decision, dict):
            raise ConfigError(f"{source}: 'decision' must be an object with 'rule' and 'threshold'")
        rule = str(decision.get("rule", "vnet"))
        if rule not in DECISION_RULES:
            raise ConfigError(f"{source}: decision rule must be one of {DECISION_RULES}, got {rule!r}")
        if rule != "vnet" and "resnet" not in nets:
            raise ConfigError(f"{source}: decision rule {rule!r} needs the resnet network under 'networks'")
        try:
            cfg = cls(
                networks=nets,
                patch_size=int(d.get("patch_size", PATCH_SIZE)),
                scale_ppm=float(norm.get("scale_ppm", NORM_SCALE_PPM)),
                clip=float(norm.get("clip", NORM_CLIP)),
                conv_input=str(d.get("conv_input", "shapes")),
                conv_threshold=float(d.get("conv_threshold", 0.5)),
                vnet_threshold=float(d.get("vnet_threshold", 0.5)),
                resnet_threshold=float(d.get("resnet_threshold", 0.5)),
                seg_threshold=float(d.get("seg_threshold", 0.5)),
                calcification_peak_ppm=float(d.get("calcification_peak_ppm", CALCIFICATION_PEAK_PPM)),
                calcification_frst_min=float(d.get("calcification_frst_min", CALCIFICATION_FRST_MIN)),
                batch_size=int(d.get("batch_size", 16)),
                vnet_readout_radius=(None if d.get("vnet_readout_radius") is None
                                     else int(d["vnet_readout_radius"])),
                stage1=Stage1Params(**s1),
                decision_rule=rule,
                decision_threshold=(None if decision.get("threshold") is None
                                    else float(decision["threshold"])),
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source} has an invalid value ({exc})") from exc
        if cfg.patch_size <= 0 or cfg.patch_size % 8:
            raise ConfigError(f"{source}: patch_size must be a positive multiple of 8, got {cfg.patch_size}")
        if cfg.conv_input not in CONV_INPUT_MODES:
            raise ConfigError(f"{source}: conv_input must be one of {CONV_INPUT_MODES}, got {cfg.conv_input!r}")
        if cfg.scale_ppm <= 0 or cfg.clip <= 0 or cfg.batch_size <= 0:
            raise ConfigError(f"{source}: normalisation scale/clip and batch_size must be positive")
        return cfg


@dataclass
class DetectionResult:
    """Findings plus what each stage passed on and the seconds per stage."""

    findings: StudyFindings
    stages: dict[str, list[dict]]
    timings_s: dict[str, float]
    segment_source: list[str] = field(default_factory=list)  # per finding, in findings order
    thresholds: dict = field(default_factory=dict)  # decision rule and each stage's operating threshold

    def stages_json(self) -> dict:
        """``stages.json`` for :mod:`training.evaluate`: the stage lists plus ``thresholds`` (the
        operating point of each scored stage; the lists hold every candidate with its probability)."""
        return {**self.stages, "thresholds": dict(self.thresholds)}


def hit_radius_mm(diameter_mm: float) -> float:
    """DESIGN.md section 7: max(3 mm, radius + 1.5 mm)."""
    return max(3.0, 0.5 * float(diameter_mm) + 1.5)


def non_maximum_suppression(centres_mm: np.ndarray, probabilities: np.ndarray,
                            diameters_mm: np.ndarray) -> list[int]:
    """Indices kept (highest probability first): a detection within the hit radius of a kept,
    more probable one (radius from the kept one's diameter) is dropped."""
    c = np.asarray(centres_mm, dtype=np.float64).reshape(-1, 3)
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    d = np.asarray(diameters_mm, dtype=np.float64).reshape(-1)
    keep: list[int] = []
    for m in np.argsort(-p, kind="stable"):
        if all(np.linalg.norm(c[m] - c[k]) > hit_radius_mm(d[k]) for k in keep):
            keep.append(int(m))
    return keep


FACE_EDGE_CORNER = np.ones((3, 3, 3), bool)  # 26-neighbour labelling of reported foci


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _vnet_segment(prob: np.ndarray, thr: float) -> np.ndarray | None:
    """The component of ``prob > thr`` holding (or nearest to) the patch centre; None when empty
    or touching the patch border."""
    fg = prob > thr
    if not fg.any():
        return None
    lab, n = ndimage.label(fg, structure=np.ones((3, 3, 3), bool))
    h = prob.shape[0] // 2
    if lab[h, h, h] > 0:
        comp = lab == lab[h, h, h]
    else:
        idx = np.argwhere(fg)
        near = idx[np.argmin(((idx - h) ** 2).sum(axis=1))]
        comp = lab == lab[tuple(near)]
    if comp[0].any() or comp[-1].any() or comp[:, 0].any() or comp[:, -1].any() \
            or comp[:, :, 0].any() or comp[:, :, -1].any():
        return None
    return comp


def _place(mask_box: np.ndarray, origin: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Clip a box mask whose [0,0,0] is at volume voxel ``origin`` to the volume: (slices, mask)."""
    lo = np.maximum(origin, 0)
    hi = np.minimum(origin + np.array(mask_box.shape), shape)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    sub = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, origin))
    return sl, mask_box[sub]


class CMBDetector:
    """Stage I + ConvScreen + V-Net (+ ResNet for the stage report) with the settings of one model
    folder. Build with :meth:`load`."""

    def __init__(self, config: DetectorConfig, networks: dict[str, torch.nn.Module],
                 device: str = "cpu") -> None:
        self.config = config
        self.networks = networks
        self.device = torch.device(device)
        for net in networks.values():
            net.to(self.device).eval()

    @classmethod
    def load(cls, model_dir: Path, device: str = "cpu") -> "CMBDetector":
        """Read ``model_dir/detector.json`` and the weights it names (sha256-checked).

        Raises:
            ConfigError: folder, config or weights missing, unreadable, altered or not matching.
        """
        model_dir = Path(model_dir)
        path = model_dir / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"model folder {model_dir} has no {CONFIG_NAME}; pass the folder with -m "
                              "or HOLOSCAN_MODEL_PATH")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc})") from exc
        cfg = DetectorConfig.from_json(raw, str(path))
        nets: dict[str, torch.nn.Module] = {}
        for name, spec in cfg.networks.items():
            f = model_dir / spec["file"]
            if not f.is_file():
                if name in REQUIRED_NETWORKS:
                    raise ConfigError(f"model file {f} named in {CONFIG_NAME} is missing")
                continue
            digest = file_sha256(f)
            if digest.lower() != spec["sha256"].lower():
                raise ConfigError(f"model file {f} does not match the sha256 in {CONFIG_NAME} "
                                  "(altered or from another training run)")
            try:
                net = NETWORK_CLASSES[name](**(spec.get("kwargs") or {}))
                state = torch.load(f, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
            except Exception as exc:  # torch raises RuntimeError, pickle errors, TypeError ...
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"model file {f} cannot be loaded as the {name} network ({first})") from exc
            nets[name] = net
        if cfg.decision_rule != "vnet" and "resnet" not in nets:
            raise ConfigError(f"the decision rule {cfg.decision_rule!r} in {path} needs the ResNet weights "
                              f"({cfg.networks['resnet']['file']}), which are missing")
        return cls(cfg, nets, device)

    # ---------------------------------------------------------------- networks
    def _forward(self, name: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Batched forward pass: (logits [N], V-Net voxel probabilities [N, D, H, W] or None)."""
        net = self.networks[name]
        logits, probs = [], []
        bs = self.config.batch_size
        with torch.no_grad():
            for a in range(0, len(x), bs):
                t = torch.from_numpy(np.ascontiguousarray(x[a:a + bs], dtype=np.float32)).to(self.device)
                out = net(t)
                if name == "vnet":
                    seg, cls_logit = out
                    probs.append(torch.sigmoid(seg[:, 0]).cpu().numpy())
                    radius = self.config.vnet_readout_radius
                    logits.append((cls_logit if radius is None else vnet_readout(seg, radius)).cpu().numpy())
                else:
                    logits.append(out.cpu().numpy())
        if not logits:
            ps = self.config.patch_size
            return np.zeros(0), (np.zeros((0, ps, ps, ps), np.float32) if name == "vnet" else None)
        return np.concatenate(logits).astype(np.float64), (np.concatenate(probs) if probs else None)

    # ---------------------------------------------------------------- detection
    def detect(self, chi_ppm: np.ndarray, brain_mask: np.ndarray, geometry: Geometry, *,
               study_instance_uid: str, algorithm_version: str, with_resnet: bool = False) -> StudyFindings:
        """Findings of one study (see :meth:`detect_stages`). The returned object also carries
        ``timings_s``, ``stages`` and ``parameters`` (:meth:`DetectorConfig.algorithm_parameters`)
        attributes (not part of its JSON). The ResNet comparator does
        not change the findings, so it runs only on request (``with_resnet``)."""
        res = self.detect_stages(chi_ppm, brain_mask, geometry, study_instance_uid=study_instance_uid,
                                 algorithm_version=algorithm_version, with_resnet=with_resnet)
        sf = res.findings
        sf.timings_s = res.timings_s  # type: ignore[attr-defined]
        sf.stages = res.stages_json()  # type: ignore[attr-defined]
        sf.parameters = self.config.algorithm_parameters()  # type: ignore[attr-defined]
        return sf

    def detect_stages(self, chi_ppm: np.ndarray, brain_mask: np.ndarray, geometry: Geometry, *,
                      study_instance_uid: str, algorithm_version: str, with_resnet: bool = True
                      ) -> DetectionResult:
        """Run every stage; return findings, each stage's candidates and seconds per stage.

        ``stages``: ``stage1`` (paramagnetic candidates; no probability, their FRST ``score`` is
        given instead, so :mod:`training.evaluate` counts each as a positive), ``conv`` (ConvScreen survivors with
        their ConvScreen probability), ``vnet`` (every survivor with its V-Net probability),
        ``resnet`` (likewise, when its weights exist and ``with_resnet`` or the decision rule uses
        it), ``decision`` (every survivor with the probability of the decision rule),
        ``handcrafted`` (with ``with_resnet``, i.e. when the comparators are asked for: the stage I
        candidates that pass the paper's hand-crafted volume / length / FA rule,
        :mod:`core.detect.handcrafted`, measured on the half-maximum region within
        ``HANDCRAFTED_REGION_MM``). A microbleed
        is a survivor whose decision probability reaches ``config.threshold``; each stage's operating
        threshold is in ``DetectionResult.thresholds``.
        Centres are the candidates' voxel centres in LPS mm.

        ``timings_s``: ``stage1_s`` (with stage I's own split as ``stage1_<step>``), ``conv_s``,
        ``vnet_s`` (patch extraction, normalisation and forward passes), ``resnet_s`` (when
        present), ``segment_s`` (segments, measurements, suppression, label map), ``total_s``.

        Raises:
            DetectionError: inconsistent shapes, empty mask, constant QSM (from stage I).
        """
        cfg = self.config
        t_all = time.perf_counter()
        tm: dict[str, float] = {}
        chi = np.asarray(chi_ppm, dtype=np.float32)
        mask = np.asarray(brain_mask, dtype=bool)
        spacing = np.asarray(geometry.spacing, dtype=float)

        t = time.perf_counter()
        cand: Candidates = detect_candidates(chi, mask, geometry, params=cfg.stage1)
        tm["stage1_s"] = time.perf_counter() - t
        for k, v in cand.timings_s.items():
            tm[f"stage1_{k}"] = float(v)
        para = np.flatnonzero(~cand.diamagnetic)
        dia = np.flatnonzero(cand.diamagnetic)

        def entries(idx, prob) -> list[dict]:
            return [{"centre_lps_mm": [round(float(v), 3) for v in cand.lps_mm[i]],
                     "probability": round(float(p), 6)} for i, p in zip(idx, prob)]

        def unscored(idx) -> list[dict]:  # candidate lists with their FRST score, no probability
            return [{"centre_lps_mm": [round(float(v), 3) for v in cand.lps_mm[i]],
                     "score": round(float(cand.score[i]), 6)} for i in idx]

        stages: dict[str, list[dict]] = {"stage1": unscored(para)}

        if with_resnet:  # comparators requested: the paper's hand-crafted baseline on the same candidates
            t = time.perf_counter()
            hc = [i for i in para if passes_handcrafted(component_features(
                half_max_region(chi, cand.voxel[i], spacing, HANDCRAFTED_REGION_MM, FACE_EDGE_CORNER)[1], spacing))[2]]
            stages["handcrafted"] = unscored(hc)
            tm["handcrafted_s"] = time.perf_counter() - t

        # ConvScreen
        t = time.perf_counter()
        conv_logit, _ = self._forward("convscreen", conv_input(cand.cubes[para], cfg.conv_input))
        conv_p = _sigmoid(conv_logit)
        keep = conv_p >= cfg.conv_threshold
        surv, surv_cp = para[keep], conv_p[keep]
        tm["conv_s"] = time.perf_counter() - t
        stages["conv"] = entries(surv, surv_cp)

        # V-Net on normalised QSM patches
        t = time.perf_counter()
        ps = cfg.patch_size
        patches = normalise_patch(extract_patches(chi, cand.voxel[surv], ps), cfg.scale_ppm, cfg.clip)
        v_logit, v_prob = self._forward("vnet", patches[:, None])
        v_p = _sigmoid(v_logit)
        tm["vnet_s"] = time.perf_counter() - t
        r_p = None
        if (with_resnet or cfg.decision_rule != "vnet") and "resnet" in self.networks:
            t = time.perf_counter()
            r_logit, _ = self._forward("resnet", patches[:, None])
            r_p = _sigmoid(r_logit)
            tm["resnet_s"] = time.perf_counter() - t
        # every survivor with each network's probability: the FROC of each is computed from these
        stages["vnet"] = entries(surv, v_p)
        if r_p is not None:
            stages["resnet"] = entries(surv, r_p)
        d_p = decision_probability(cfg.decision_rule, v_p, r_p)
        stages["decision"] = entries(surv, d_p)
        thresholds = {"conv": cfg.conv_threshold, "vnet": cfg.vnet_threshold, "decision": cfg.threshold}
        if r_p is not None:
            thresholds["resnet"] = cfg.resnet_threshold
        kept = np.flatnonzero(d_p >= cfg.threshold)

        # segments -> measured detections
        t = time.perf_counter()
        dets: list[dict] = []
        h = ps // 2
        for m in kept:
            ci = cand.voxel[surv[m]]
            comp = _vnet_segment(v_prob[m], cfg.seg_threshold)
            source = "vnet"
            if comp is not None:
                sl, reg = _place(comp, ci - h, chi.shape)
            else:
                source = "stage1"
                sl, reg, _, _ = half_max_region(chi, ci, spacing, structure=FACE_EDGE_CORNER)
            dets.append(dict(kind="cmb", sl=sl, region=reg & mask[sl], probability=float(d_p[m]),
                             source=source, voxel=ci))
        neg = -chi
        for i in dia:
            if (float(cand.peak_chi_ppm[i]) >= cfg.calcification_peak_ppm
                    or float(cand.score[i]) < cfg.calcification_frst_min):
                continue
            sl, reg, _, _ = half_max_region(neg, cand.voxel[i], spacing, structure=FACE_EDGE_CORNER)
            dets.append(dict(kind="calcification", sl=sl, region=reg & mask[sl], probability=1.0,
                             source="stage1", voxel=cand.voxel[i]))
        findings, sources = self._assemble(dets, chi, geometry, study_instance_uid, algorithm_version)
        tm["segment_s"] = time.perf_counter() - t
        tm["total_s"] = time.perf_counter() - t_all
        return DetectionResult(findings, stages, {k: round(v, 4) for k, v in tm.items()}, sources,
                               {"rule": cfg.decision_rule, **thresholds})

    def _assemble(self, dets: list[dict], chi: np.ndarray, geometry: Geometry, uid: str, version: str
                  ) -> tuple[StudyFindings, list[str]]:
        """Measure, suppress duplicates, build the label map (stronger detections first)."""
        vv = float(geometry.voxel_volume_mm3)
        for d in dets:
            if not d["region"].any():  # only outside the brain mask: keep the candidate voxel
                d["region"][tuple(int(c) - s.start for c, s in zip(d["voxel"], d["sl"]))] = True
            idx = np.argwhere(d["region"]) + np.array([s.start for s in d["sl"]])
            d["centroid"] = idx.mean(axis=0)
            d["lps"] = np.asarray(geometry.voxel_to_patient(d["centroid"]), dtype=float).reshape(3)
            d["diam"] = float((6.0 * len(idx) * vv / np.pi) ** (1.0 / 3.0))
        label_map = np.zeros(chi.shape, np.uint16)
        out: list[dict] = []
        for kind in ("cmb", "calcification"):
            ds = [d for d in dets if d["kind"] == kind]
            keep = non_maximum_suppression(np.array([d["lps"] for d in ds]).reshape(-1, 3),
                                           np.array([d["probability"] for d in ds]),
                                           np.array([d["diam"] for d in ds]))
            out += [ds[k] for k in keep]
        findings: list[Finding] = []
        sources: list[str] = []
        for d in out:  # cmb (by probability) first, then calcifications
            n = len(findings) + 1
            sub = label_map[d["sl"]]
            free = d["region"] & (sub == 0)
            if not free.any():
                continue  # entirely inside a stronger detection: a duplicate
            idx = np.argwhere(free) + np.array([s.start for s in d["sl"]])
            if d["kind"] == "cmb" and float(chi[tuple(idx.T)].mean()) <= 0.0:
                continue  # a microbleed is paramagnetic: no positive QSM in its segment, not one
            sub[free] = n
            centroid = idx.mean(axis=0)
            vol = float(len(idx)) * vv
            findings.append(Finding(
                index=n, kind=d["kind"],
                centre_lps_mm=tuple(float(v) for v in np.asarray(geometry.voxel_to_patient(centroid)).reshape(3)),
                centre_voxel=tuple(float(v) for v in centroid),
                diameter_mm=float((6.0 * vol / np.pi) ** (1.0 / 3.0)), volume_mm3=vol,
                mean_chi_ppm=float(chi[tuple(idx.T)].mean()),
                probability=float(np.clip(d["probability"], 0.0, 1.0)), mask_label=n))
            sources.append(d["source"])
        return StudyFindings(uid, version, findings, label_map), sources
