"""Training data for stage II: simulated subjects -> QSM (our chain) -> stage I candidates -> shards.

Per subject (deterministic in ``seed``):

1. simulate (:func:`training.sim.phantom.simulate_subject`), optionally insert extra microbleeds
   with their dipole fields and signal loss (:func:`training.sim.insert.insert_microbleeds`);
2. reconstruct QSM from the simulated magnitude/phase with :func:`core.qsm.pipeline.reconstruct`
   (what the app sees; the truth chi is never the detector's input);
3. stage I (:func:`core.detect.stage1.detect_candidates`);
4. label each candidate against truth with the hit rule of DESIGN.md section 7: a candidate hits a
   reference lesion when its centre lies within ``max(3 mm, lesion radius + 1.5 mm)`` of the lesion
   centre, matched one to one (:func:`match_hits`, maximum matching by the Hungarian algorithm).
   Paramagnetic candidates are matched to microbleeds, diamagnetic ones to calcifications.
   Labels: ``cmb`` (matched), ``cmb_duplicate`` (paramagnetic, within the rule of an already
   matched microbleed: a false positive by the one-to-one rule, but its patch holds a bleed),
   ``calcification`` (within the rule of a calcification, either polarity), ``vessel`` (vein truth
   mask within 2 mm of the centre), ``other``;
5. save ``DIR/<subject>.npz``: ``patches`` float16 [N, 32, 32, 32] QSM around each candidate
   (candidate voxel at index 16), ``masks`` uint8 [N, 32, 32, 32] (sphere of the truth diameter at
   the truth centre, partial-volume >= 0.5, for ``cmb``/``cmb_duplicate`` candidates; zero
   otherwise), ``cubes`` float16 [N, 7, 7, 7] FRST cubes, ``labels`` (str), ``label_codes``,
   ``features`` float32 [N, F] with ``feature_names``, ``voxel``, ``lps_mm``, ``diamagnetic``,
   ``lesion_index`` (matched truth lesion or -1), ``spacing_mm``; and ``DIR/<subject>.json``
   (acquisition, truth lesions, stage I statistics: TP, FN with the missed lesions' size, chi and
   MARS region, FP, candidates).

CLI::

    python -m training.dataset --out DIR --subjects N --seed S [--controls K]
        [--voxel-mm X Y Z] [--echoes E|mixed] [--oblique-max DEG] [--insert-per-subject M]
        [--insert-deep-fraction F] [--n-cmb N] [--threshold T]
        [--family default|randomised] [--voxel-range-mm MIN MAX]

The last K subjects are controls; subject ``s`` gets seed ``S * 100003 + s``; ``DIR/summary.json``
collects per-subject and aggregate stage I figures (sensitivity, false positives and candidates per
subject, seconds).

``--cluster local[:N]`` or ``--cluster tcp://HOST:PORT`` builds the subjects as one Dask task each
(:mod:`training.cluster`); without it they are built one after the other in this process. Either
way a subject whose ``<subject>.npz`` and ``<subject>.json`` exist with the expected seed is skipped
and its summary row read back from the json (``--redo`` builds it again), both files are written to
a temporary name and moved into place, and a failing subject is reported and listed under
``failed`` in ``summary.json`` while the others go on (exit status 1). ``--threads``: torch threads
per subject (default: torch's own here, 1 on a cluster).
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from core.detect.stage1 import FEATURE_NAMES, Stage1Params, detect_candidates
from training.cluster import (ClusterSpecError, add_cohort_arguments, atomic_write, check_cohort_arguments,
                              run_subjects, summarise, write_text_atomic)

PATCH_SIZE = 32
LABELS: tuple[str, ...] = ("other", "cmb", "cmb_duplicate", "calcification", "vessel")
VESSEL_DISTANCE_MM = 2.0


def hit_distance_mm(radius_mm: float) -> float:
    """DESIGN.md section 7: max(3 mm, lesion radius + 1.5 mm)."""
    return max(3.0, float(radius_mm) + 1.5)


def match_hits(
    candidates_lps: np.ndarray,
    lesion_centres_lps: Sequence[Sequence[float]],
    lesion_radii_mm: Sequence[float],
) -> list[tuple[int, int]]:
    """One-to-one hits (candidate index, lesion index): the largest set of pairs whose distance is
    within :func:`hit_distance_mm` of the lesion radius, ties broken by the smallest total distance
    (Hungarian algorithm on distance with a prohibitive cost for pairs out of range)."""
    c = np.asarray(candidates_lps, dtype=np.float64).reshape(-1, 3)
    les = np.asarray(lesion_centres_lps, dtype=np.float64).reshape(-1, 3)
    if len(c) == 0 or len(les) == 0:
        return []
    d = np.linalg.norm(c[:, None, :] - les[None, :, :], axis=2)
    lim = np.array([hit_distance_mm(r) for r in lesion_radii_mm])[None, :]
    ok = d <= lim
    if not ok.any():
        return []
    big = 1e6 + d.sum()
    cost = np.where(ok, d, big)
    rows, cols = linear_sum_assignment(cost)
    return sorted((int(r), int(k)) for r, k in zip(rows, cols) if ok[r, k])


def label_candidates(
    cand_lps: np.ndarray,
    diamagnetic: np.ndarray,
    lesions: Sequence,
    vein_near: np.ndarray | None = None,
) -> tuple[list[str], np.ndarray]:
    """Labels (see module docstring) and the matched truth lesion index (or -1) per candidate.

    ``lesions``: objects with ``kind``, ``centre_lps_mm``, ``diameter_mm``. ``vein_near``: bool per
    candidate, a vein within :data:`VESSEL_DISTANCE_MM` of its centre (None: no vein truth).
    """
    cand = np.asarray(cand_lps, dtype=np.float64).reshape(-1, 3)
    dia = np.asarray(diamagnetic, dtype=bool).reshape(-1)
    n = len(cand)
    labels = ["other"] * n
    index = np.full(n, -1, dtype=np.int64)
    for kind, pol in (("cmb", False), ("calcification", True)):
        idx_l = [j for j, le in enumerate(lesions) if le.kind == kind]
        idx_c = np.flatnonzero(dia == pol)
        if not idx_l or not len(idx_c):
            continue
        pairs = match_hits(cand[idx_c], [lesions[j].centre_lps_mm for j in idx_l],
                           [lesions[j].diameter_mm / 2 for j in idx_l])
        for a, b in pairs:
            labels[idx_c[a]] = kind
            index[idx_c[a]] = idx_l[b]
    for m in range(n):
        if labels[m] != "other":
            continue
        best = None
        for j, le in enumerate(lesions):
            dist = float(np.linalg.norm(cand[m] - np.asarray(le.centre_lps_mm)))
            if dist <= hit_distance_mm(le.diameter_mm / 2) and (best is None or dist < best[0]):
                best = (dist, j)
        if best is not None:
            le = lesions[best[1]]
            if le.kind == "calcification":
                labels[m], index[m] = "calcification", best[1]
            elif not dia[m]:
                labels[m], index[m] = "cmb_duplicate", best[1]
        if labels[m] == "other" and vein_near is not None and bool(vein_near[m]):
            labels[m] = "vessel"
    return labels, index


def _patches(volume: np.ndarray, centres: np.ndarray, size: int = PATCH_SIZE) -> np.ndarray:
    """[N, size, size, size] crops with the centre voxel at index size // 2 (zero padded)."""
    h = size // 2
    v = np.pad(np.asarray(volume, dtype=np.float32), h)
    out = np.zeros((len(centres), size, size, size), np.float32)
    for m, c in enumerate(np.asarray(centres, dtype=np.int64).reshape(-1, 3)):
        out[m] = v[c[0]:c[0] + size, c[1]:c[1] + size, c[2]:c[2] + size]
    return out


def lesion_mask_patch(
    centre_voxel: np.ndarray, spacing_mm: Sequence[float], lesion_voxel: Sequence[float], diameter_mm: float,
    size: int = PATCH_SIZE,
) -> np.ndarray:
    """uint8 [size]^3 mask of a sphere (truth centre and diameter) on the patch grid centred at
    ``centre_voxel``: voxels whose sub-sampled (3^3) inside fraction is >= 0.5; at least the voxel
    holding the lesion centre when the sphere is smaller than a voxel."""
    sp = np.asarray(spacing_mm, dtype=np.float64)
    off = np.asarray(lesion_voxel, dtype=np.float64) - np.asarray(centre_voxel, dtype=np.float64) + size // 2
    sub = (np.arange(3) - 1) / 3.0
    frac = np.zeros((size,) * 3, np.float32)
    ax = np.arange(size, dtype=np.float64)
    r2 = (diameter_mm / 2.0) ** 2
    for si in sub:
        di = ((ax + si - off[0]) * sp[0]) ** 2
        for sj in sub:
            dj = ((ax + sj - off[1]) * sp[1]) ** 2
            for sk in sub:
                dk = ((ax + sk - off[2]) * sp[2]) ** 2
                frac += (di[:, None, None] + dj[None, :, None] + dk[None, None, :] <= r2)
    mask = (frac / 27.0 >= 0.5).astype(np.uint8)
    ci = tuple(int(round(o)) for o in off)
    if all(0 <= a < size for a in ci):
        mask[ci] = 1
    return mask


def _vein_near(vein_mask: np.ndarray | None, voxel: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    if vein_mask is None:
        return None
    h = np.ceil(VESSEL_DISTANCE_MM / spacing).astype(int)
    out = np.zeros(len(voxel), bool)
    for m, c in enumerate(voxel):
        sl = tuple(slice(max(int(ci) - hi, 0), int(ci) + hi + 1) for ci, hi in zip(c, h))
        sub = vein_mask[sl]
        if not sub.any():
            continue
        idx = np.argwhere(sub) + np.array([s.start for s in sl])
        out[m] = bool((np.linalg.norm((idx - c) * spacing, axis=1) <= VESSEL_DISTANCE_MM).any())
    return out


def _map_max_near(frst_map: np.ndarray | None, lesion, spacing: np.ndarray) -> float | None:
    """Largest stage I score within the hit distance of a lesion (why a lesion was missed: below
    threshold, or no local maximum there)."""
    if frst_map is None:
        return None
    r = hit_distance_mm(lesion.diameter_mm / 2)
    c = np.asarray(lesion.centre_voxel, dtype=np.float64)
    h = np.ceil(r / spacing).astype(int)
    lo = np.maximum(np.floor(c).astype(int) - h, 0)
    hi = np.minimum(np.ceil(c).astype(int) + h + 1, frst_map.shape)
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    near = np.linalg.norm((idx - c) * spacing, axis=-1) <= r
    sub = frst_map[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return round(float(sub[near].max()), 4) if near.any() else 0.0


def build_subject(
    subject_id: str,
    seed: int,
    *,
    voxel_mm: Sequence[float] = (1.0, 1.0, 1.0),
    echoes: int | str = 4,
    oblique_max_deg: float = 0.0,
    control: bool = False,
    insert_per_subject: int = 0,
    insert_deep_fraction: float = 0.0,
    n_cmb: int | None = None,
    n_calc: int | None = None,
    shape: Sequence[int] | None = None,
    params: Stage1Params = Stage1Params(),
    qsm_method: str = "star",
    family: str = "default",
    voxel_range_mm: tuple[float, float] | None = None,
) -> dict:
    """Simulate, reconstruct, detect and label one subject; returns the shard arrays and metadata.

    ``echoes``: number of echoes (6 ms spacing from 6 ms; 1 echo at 23 ms) or ``"mixed"`` (1, 3,
    4 or 5 drawn per subject). ``oblique_max_deg``: slab tilt drawn uniformly in +-this.
    ``family``: phantom family (:mod:`training.sim.family`); ``"randomised"`` draws voxel size,
    echo times, B0, SNR, tissue and lesion properties per subject (``voxel_mm``, ``echoes`` and
    ``shape`` are then not used; ``voxel_range_mm`` narrows the voxel draw). Inserted microbleeds
    (``insert_per_subject``) stay spheres with the default family's contrast in either family, and
    the V-Net mask of a non-spherical lesion is the sphere of its equivalent diameter at its centroid.
    Returns ``{"arrays": {...}, "meta": {...}}`` (see module docstring).
    """
    from core.qsm.pipeline import reconstruct
    from training.sim import phantom
    from training.sim.insert import insert_microbleeds

    rng = np.random.default_rng([int(seed), 7919])
    if family != "default":
        n_e = 0  # drawn by the family
    elif echoes == "mixed":
        n_e = int(rng.choice([1, 3, 4, 5]))
    else:
        n_e = int(echoes)
    tes = [phantom.SINGLE_ECHO_TIME_S] if n_e == 1 else [0.006 * (e + 1) for e in range(n_e)]
    tilt = float(rng.uniform(-oblique_max_deg, oblique_max_deg)) if oblique_max_deg > 0 else 0.0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if family == "default":
        acquisition = {"shape": shape, "voxel_mm": voxel_mm, "echo_times_s": tes}
    else:
        from training.sim.family import RandomisedRanges

        acquisition = {"family_ranges": RandomisedRanges(**({"voxel_mm": tuple(voxel_range_mm)} if voxel_range_mm else {}))}
    study = phantom.simulate_subject(subject_id, int(seed), tilt_deg=tilt, control=control, n_cmb=n_cmb,
                                     n_calc=n_calc, family=family, **acquisition)
    timings["simulate_s"] = time.perf_counter() - t0
    n_inserted = 0
    if insert_per_subject > 0 and not control:
        t = time.perf_counter()
        before = len(study.lesions)
        study = insert_microbleeds(study, insert_per_subject, rng, deep_gm_fraction=insert_deep_fraction)
        n_inserted = len(study.lesions) - before
        timings["insert_s"] = time.perf_counter() - t
    t = time.perf_counter()
    qsm = reconstruct(study.magnitude, study.phase_rad, study.acquisition.echo_times_s,
                      study.acquisition.field_strength_t, study.geometry, method=qsm_method)
    timings["qsm_s"] = time.perf_counter() - t
    t = time.perf_counter()
    cands = detect_candidates(qsm.chi_ppm, qsm.mask, study.geometry, params=params, keep_maps=True)
    timings["stage1_s"] = time.perf_counter() - t
    spacing = np.asarray(study.geometry.spacing)
    vein = study.extra_truth.get("vein_mask")
    labels, index = label_candidates(cands.lps_mm, cands.diamagnetic, study.lesions,
                                     _vein_near(vein, cands.voxel, spacing))
    patches = _patches(qsm.chi_ppm, cands.voxel)
    masks = np.zeros(patches.shape, np.uint8)
    for m, (lab, j) in enumerate(zip(labels, index)):
        if lab in ("cmb", "cmb_duplicate"):
            le = study.lesions[int(j)]
            masks[m] = lesion_mask_patch(cands.voxel[m], spacing, le.centre_voxel, le.diameter_mm)
    cmb_idx = [j for j, le in enumerate(study.lesions) if le.kind == "cmb"]
    hit = {int(j) for lab, j in zip(labels, index) if lab == "cmb"}
    para = ~cands.diamagnetic
    n_fp = int(sum(1 for lab, p in zip(labels, para) if p and lab != "cmb"))
    missed = [dict(study.lesions[j].to_json(), index=j,
                   frst_max_nearby=_map_max_near(cands.frst_map, study.lesions[j], spacing))
              for j in cmb_idx if j not in hit]
    cands.frst_map = cands.frst_map_dia = None
    stats = {
        "cmb_total": len(cmb_idx),
        "tp": len(hit),
        "fn": len(cmb_idx) - len(hit),
        "fp": n_fp,
        "sensitivity": (len(hit) / len(cmb_idx)) if cmb_idx else None,
        "candidates_paramagnetic": int(para.sum()),
        "candidates_diamagnetic": int((~para).sum()),
        "calcifications_total": sum(1 for le in study.lesions if le.kind == "calcification"),
        "calcifications_found": sum(1 for lab, d in zip(labels, cands.diamagnetic) if d and lab == "calcification"),
        "label_counts": {k: int(sum(1 for lab in labels if lab == k)) for k in LABELS},
        "missed": missed,
        "sigma_ppm": cands.sigma_ppm,
    }
    arrays = {
        "patches": patches.astype(np.float16),
        "masks": masks,
        "cubes": cands.cubes.astype(np.float16),
        "labels": np.array(labels, dtype="<U16"),
        "label_codes": np.array([LABELS.index(lab) for lab in labels], dtype=np.int8),
        "features": cands.features(),
        "feature_names": np.array(FEATURE_NAMES),
        "voxel": cands.voxel.astype(np.int32),
        "lps_mm": cands.lps_mm.astype(np.float32),
        "diamagnetic": cands.diamagnetic,
        "lesion_index": index,
        "spacing_mm": spacing.astype(np.float32),
    }
    meta = {
        "subject_id": subject_id,
        "seed": int(seed),
        "control": bool(control),
        "voxel_mm": [float(v) for v in spacing],
        "shape": [int(n) for n in study.geometry.shape],
        "tilt_deg": tilt,
        "echo_times_s": list(study.acquisition.echo_times_s),
        "field_strength_t": study.acquisition.field_strength_t,
        "qsm_method": qsm_method,
        "family": study.family,
        **({"family_params": study.family_params} if study.family_params is not None else {}),
        "inserted_cmb": n_inserted,
        "insert_deep_fraction": float(insert_deep_fraction),
        "stage1_params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(params).items()},
        "lesions": [le.to_json() for le in study.lesions],
        "stage1": stats,
        "timings_s": {**timings, "stage1_detail": cands.timings_s},
    }
    return {"arrays": arrays, "meta": meta}


def write_shard(result: dict, out_dir: str) -> str:
    """Write ``<subject>.npz`` then ``<subject>.json`` into ``out_dir``, each under a temporary name
    moved into place (:func:`training.cluster.atomic_write`); returns the npz path."""
    os.makedirs(out_dir, exist_ok=True)
    sid = result["meta"]["subject_id"]
    path = os.path.join(out_dir, f"{sid}.npz")
    buf = io.BytesIO()
    np.savez_compressed(buf, **result["arrays"])
    atomic_write(path, lambda fh: fh.write(buf.getbuffer()))
    write_text_atomic(os.path.join(out_dir, f"{sid}.json"), json.dumps(result["meta"], indent=1))
    return path


SUMMARY_KEYS = ("cmb_total", "tp", "fn", "fp", "candidates_paramagnetic", "candidates_diamagnetic")


def summary_row(meta: dict) -> dict:
    """The ``summary.json`` row of one subject, from its shard json."""
    st = meta["stage1"]
    return {"subject": meta["subject_id"], **{k: st[k] for k in SUMMARY_KEYS},
            "stage1_s": meta["timings_s"]["stage1_s"], "total_s": meta["timings_s"].get("total_s")}


def completed_shard(out_dir: str, sid: str, seed: int) -> dict | None:
    """Summary row of a subject whose npz and json are in ``out_dir`` with ``seed``, else None."""
    npz, js = os.path.join(out_dir, f"{sid}.npz"), os.path.join(out_dir, f"{sid}.json")
    if not (os.path.isfile(npz) and os.path.isfile(js)):
        return None
    try:
        with open(js) as fh:
            meta = json.load(fh)
        return summary_row(meta) if meta.get("seed") == seed else None
    except (OSError, ValueError, KeyError):
        return None


def dataset_task(sid: str, *, plan: dict, out: str, options: dict, threads: int | None) -> dict:
    """Build and write one subject (a cluster or in-process task); returns its summary row.

    ``plan``: subject id -> (seed, control); ``options``: the other :func:`build_subject` keywords.
    """
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    seed, control = plan[sid]
    t = time.perf_counter()
    res = build_subject(sid, seed, control=control, **options)
    res["meta"]["timings_s"]["total_s"] = time.perf_counter() - t  # simulate .. labels, not the write
    write_shard(res, out)
    return summary_row(res["meta"])


def aggregate(summary: Sequence[dict]) -> dict:
    """Cohort figures of ``summary.json`` from its per-subject rows."""
    n = max(len(summary), 1)
    tot = sum(x["cmb_total"] for x in summary)
    tp = sum(x["tp"] for x in summary)
    return {"subjects": len(summary), "cmb_total": tot, "tp": tp,
            "sensitivity": tp / tot if tot else None,
            "fp_per_subject": sum(x["fp"] for x in summary) / n,
            "candidates_per_subject": sum(x["candidates_paramagnetic"] for x in summary) / n,
            "stage1_s_mean": sum(x["stage1_s"] for x in summary) / n}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.dataset", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--controls", type=int, default=0, help="the last K subjects are controls")
    ap.add_argument("--voxel-mm", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    ap.add_argument("--echoes", default="4", help="number of echoes or 'mixed'")
    ap.add_argument("--oblique-max", type=float, default=0.0)
    ap.add_argument("--insert-per-subject", type=int, default=0)
    ap.add_argument("--insert-deep-fraction", type=float, default=0.0,
                    help="share of inserted microbleeds placed in the deep grey nuclei (iron background)")
    ap.add_argument("--n-cmb", type=int, default=None, help="microbleeds per subject (default random 0-15)")
    ap.add_argument("--threshold", type=float, default=None, help="override the stage I threshold")
    ap.add_argument("--family", choices=("default", "randomised"), default="default",
                    help="phantom family (training.sim.family); randomised draws voxel, echoes, B0, SNR, "
                         "tissue and lesion properties per subject (--voxel-mm and --echoes unused)")
    ap.add_argument("--voxel-range-mm", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                    help="randomised family: voxel size range (default 0.5 1.5)")
    add_cohort_arguments(ap, "build subjects whose shards already exist")
    a = ap.parse_args(argv)
    check_cohort_arguments(ap, a)
    echoes: int | str = a.echoes if a.echoes == "mixed" else int(a.echoes)
    params = Stage1Params() if a.threshold is None else Stage1Params(threshold=a.threshold)
    plan = {f"sub{a.seed:04d}_{s:03d}": (a.seed * 100003 + s, s >= a.subjects - a.controls)
            for s in range(a.subjects)}
    options = {"voxel_mm": tuple(a.voxel_mm), "echoes": echoes, "oblique_max_deg": a.oblique_max,
               "insert_per_subject": a.insert_per_subject, "insert_deep_fraction": a.insert_deep_fraction,
               "n_cmb": a.n_cmb, "params": params, "family": a.family,
               "voxel_range_mm": tuple(a.voxel_range_mm) if a.voxel_range_mm else None}
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    threads = a.threads if a.threads is not None else (1 if a.cluster is not None else None)
    task = functools.partial(dataset_task, plan=plan, out=out, options=options, threads=threads)

    def completed(sid: str) -> dict | None:
        return None if a.redo else completed_shard(out, sid, plan[sid][0])

    try:
        outcomes = run_subjects(list(plan), task, completed=completed, cluster=a.cluster,
                                describe=lambda sid, row: json.dumps(row), progress=not a.no_progress)
    except ClusterSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = [o.record for o in outcomes if o.record is not None]
    failed = [{"subject": o.subject, "error": o.error} for o in outcomes if o.status == "failed"]
    agg = aggregate(summary)
    write_text_atomic(os.path.join(out, "summary.json"),
                      json.dumps({"family": a.family, "subjects": summary, "aggregate": agg, "failed": failed}, indent=1))
    print(json.dumps(agg))
    return summarise(outcomes)


if __name__ == "__main__":
    sys.exit(main())
