"""QSM accuracy benchmark on simulated subjects: TKD and STAR-QSM chains side by side.

    python -m bench.qsm [--voxel-mm 1.5] [--out bench/results/qsm.json] [--subjects 6]
                        [--bg-method vsharp|pdf|lbv]

Each subject is simulated (:func:`training.sim.phantom.simulate_subject`, fixed seeds), written as
vendor DICOM (:func:`training.sim.dicom_writer.write_study`) and read back with
:func:`core.dicom.reader.load_gre`, so the vendor phase conventions are exercised; then both chains
(:func:`core.qsm.pipeline.reconstruct`, ``method="tkd"`` and ``"star"``) run on the same input.

Metrics (definitions in :mod:`core.qsm.metrics`), per subject and method:

* step "mask": Dice of the chain's brain mask against the simulated brain mask;
* step "local field": nRMSE (%) of the local field (V-SHARP, or ``--bg-method``) against the true
  local field (forward field of the true susceptibility inside the eroded mask) over the eroded mask;
* end to end, over (eroded mask & true brain mask): nRMSE (%), HFEN (%), XSIM; deep grey matter
  mean susceptibility per structure (recon and truth, both referenced to their mean over that mask);
  microbleed contrast recovery (lesions >= 3 mm: mean recon / mean truth in the sphere); calcification
  streaking and sign (mean recon inside each calcification must be negative).

Voxel size: 1.5 mm isotropic by default (a full 1 mm cohort takes ~4x longer on 2 shared cores); the
cohort: Siemens / Philips / GE, multi-echo (4) and single-echo, one 15 degree oblique slab.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core import physics
from core.dicom.reader import load_gre
from core.qsm import metrics as M
from core.qsm.pipeline import BG_METHODS, reconstruct
from training.sim.dicom_writer import write_study
from training.sim.phantom import DEFAULT_ECHO_TIMES_S, SINGLE_ECHO_TIME_S, simulate_subject

COHORT = [
    {"id": "b01", "seed": 3101, "vendor": "siemens", "echoes": 4, "tilt_deg": 0.0},
    {"id": "b02", "seed": 3102, "vendor": "philips", "echoes": 4, "tilt_deg": 0.0},
    {"id": "b03", "seed": 3103, "vendor": "ge", "echoes": 4, "tilt_deg": 0.0},
    {"id": "b04", "seed": 3104, "vendor": "siemens", "echoes": 1, "tilt_deg": 0.0},
    {"id": "b05", "seed": 3105, "vendor": "philips", "echoes": 1, "tilt_deg": 0.0, "philips_units": "mrad"},
    {"id": "b06", "seed": 3106, "vendor": "ge", "echoes": 4, "tilt_deg": 15.0},
]
METHODS = ("tkd", "star")
MIN_CMB_DIAMETER_MM = 3.0
TARGETS = {"star_over_tkd_nrmse": 0.8, "mask_dice": 0.95, "cmb_recovery": 0.6}


def _r(x: float, n: int = 4) -> float:
    return float(round(float(x), n))


def evaluate(study, res, true_local: np.ndarray | None = None) -> dict:
    """All metrics of one reconstruction against the study's truth."""
    sp = study.geometry.spacing
    truth, bm = study.chi_ppm, study.brain_mask
    em = res.eroded_mask
    ev = em & bm
    if true_local is None:
        true_local = physics.forward_field_ppm(np.where(em, truth, 0).astype(np.float32), sp,
                                               study.geometry.b0_direction_ijk(), pad_factor=1.5)
    t0 = np.where(ev, truth - truth[ev].mean(), 0.0)
    r0 = np.where(ev, res.chi_ppm - res.chi_ppm[ev].mean(), 0.0)
    out = {
        "mask_dice": _r(M.dice(res.mask, bm)),
        "local_field_nrmse_pct": _r(M.nrmse(res.local_field_ppm, true_local, em), 2),
        "chi_nrmse_pct": _r(M.nrmse(res.chi_ppm, truth, ev), 2),
        "chi_hfen_pct": _r(M.hfen(res.chi_ppm, truth, ev), 2),
        "chi_xsim": _r(M.xsim(res.chi_ppm, truth, ev)),
        "timings_s": {k: _r(v, 2) for k, v in res.timings_s.items()},
    }
    labels = study.extra_truth["deep_gm_labels"]
    codes = study.extra_truth["deep_gm_codes"]
    rt, rr = M.roi_means(t0, labels, codes, ev), M.roi_means(r0, labels, codes, ev)
    out["deep_gm_ppm"] = {k: {"truth": _r(rt[k]), "recon": _r(rr[k])} for k in rt}
    out["deep_gm_mean_abs_err_ppm"] = _r(np.mean([abs(rr[k] - rt[k]) for k in rt])) if rt else None
    cmbs, calcs = [], []
    for les in study.lesions:
        sph = M.sphere_mask(truth.shape, les.centre_voxel, les.diameter_mm / 2, sp) & bm
        if not sph.any():
            continue
        if not (sph & ev).any():  # outside the evaluation mask: reported, not scored
            (cmbs if les.kind == "cmb" else calcs).append(
                {"diameter_mm": _r(les.diameter_mm, 2), "chi_ppm": _r(les.chi_ppm, 3), "outside_eroded_mask": True})
            continue
        sph = sph & ev
        if les.kind == "cmb" and les.diameter_mm >= MIN_CMB_DIAMETER_MM:
            cmbs.append({"diameter_mm": _r(les.diameter_mm, 2), "chi_ppm": _r(les.chi_ppm, 3),
                         "recovery": _r(M.contrast_recovery(r0, t0, sph))})
        elif les.kind == "calcification":
            item = {"diameter_mm": _r(les.diameter_mm, 2), "chi_ppm": _r(les.chi_ppm, 3),
                    "recon_mean_ppm": _r(float(r0[sph].mean())),
                    "truth_mean_ppm": _r(float(t0[sph].mean()))}
            try:
                item["streaking"] = _r(M.streaking(r0, t0, les.centre_voxel, les.diameter_mm / 2, sp, ev))
            except ValueError:
                item["streaking"] = None
            calcs.append(item)
    out["cmbs"] = cmbs
    scored = [c["recovery"] for c in cmbs if "recovery" in c]
    out["cmb_recovery_mean"] = _r(np.mean(scored)) if scored else None
    out["calcifications"] = calcs
    out["calcifications_all_negative"] = all(c["recon_mean_ppm"] < 0 for c in calcs if "recon_mean_ppm" in c)
    out["lesions_outside_eroded_mask"] = sum(1 for c in cmbs + calcs if c.get("outside_eroded_mask"))
    st = [c["streaking"] for c in calcs if c.get("streaking") is not None]
    out["calc_streaking_mean"] = _r(np.mean(st)) if st else None
    return out


def run_subject(entry: dict, voxel_mm: float, workdir: Path, bg_method: str = "vsharp") -> dict:
    echoes = list(DEFAULT_ECHO_TIMES_S) if entry["echoes"] > 1 else [SINGLE_ECHO_TIME_S]
    t = time.perf_counter()
    study = simulate_subject(entry["id"], entry["seed"], voxel_mm=(voxel_mm,) * 3, tilt_deg=entry["tilt_deg"],
                             echo_times_s=echoes, n_cmb=6, n_calc=2, cmb_diameter_mm=(3.0, 8.0))
    t_sim = time.perf_counter() - t
    folder = workdir / entry["id"]
    write_study(study, folder, entry["vendor"], philips_phase_units=entry.get("philips_units", "rad"))
    vol = load_gre(folder)
    rec = {**entry, "shape": list(study.geometry.shape), "simulate_s": _r(t_sim, 1),
           "phase_scaling": vol.phase_scaling,
           "n_cmb_ge3mm": sum(1 for l in study.lesions if l.kind == "cmb" and l.diameter_mm >= 3),
           "n_calcification": sum(1 for l in study.lesions if l.kind == "calcification")}
    true_local = None
    for m in METHODS:
        res = reconstruct(vol.magnitude, vol.phase_rad, vol.echo_times_s, vol.field_strength_t,
                          vol.geometry, method=m, bg_method=bg_method)
        if true_local is None:
            em = res.eroded_mask
            true_local = physics.forward_field_ppm(np.where(em, study.chi_ppm, 0).astype(np.float32),
                                                   study.geometry.spacing,
                                                   study.geometry.b0_direction_ijk(), pad_factor=1.5)
        rec[m] = evaluate(study, res, true_local)
    return rec


def summarise(subjects: list[dict]) -> dict:
    keys = ["mask_dice", "local_field_nrmse_pct", "chi_nrmse_pct", "chi_hfen_pct", "chi_xsim",
            "deep_gm_mean_abs_err_ppm", "cmb_recovery_mean", "calc_streaking_mean"]
    means = {}
    for m in METHODS:
        means[m] = {}
        for k in keys:
            vals = [s[m][k] for s in subjects if s[m][k] is not None]
            means[m][k] = _r(np.mean(vals)) if vals else None
        means[m]["total_s"] = _r(np.mean([s[m]["timings_s"]["total"] for s in subjects]), 2)
        means[m]["calcifications_all_negative"] = all(s[m]["calcifications_all_negative"] for s in subjects)
    ratio = means["star"]["chi_nrmse_pct"] / means["tkd"]["chi_nrmse_pct"]
    done = {
        "star_over_tkd_nrmse": {"value": _r(ratio), "target": "<= 0.8", "met": ratio <= 0.8},
        "mask_dice": {"value": means["star"]["mask_dice"], "target": ">= 0.95",
                      "met": means["star"]["mask_dice"] >= 0.95},
        "cmb_recovery_star": {"value": means["star"]["cmb_recovery_mean"], "target": ">= 0.6",
                              "met": (means["star"]["cmb_recovery_mean"] or 0) >= 0.6},
        "calcifications_negative_star": {"value": means["star"]["calcifications_all_negative"],
                                         "met": means["star"]["calcifications_all_negative"]},
    }
    return {"means": means, "done_when": done}


def table(subjects: list[dict], summary: dict) -> str:
    cols = [("dice", "mask_dice"), ("locF%", "local_field_nrmse_pct"), ("nRMSE%", "chi_nrmse_pct"),
            ("HFEN%", "chi_hfen_pct"), ("XSIM", "chi_xsim"), ("dGM|err|", "deep_gm_mean_abs_err_ppm"),
            ("CMBrec", "cmb_recovery_mean"), ("calcStrk", "calc_streaking_mean")]
    head = f"{'subject':<26}{'meth':<5}" + "".join(f"{c:>10}" for c, _ in cols) + f"{'calc<0':>8}{'sec':>7}"
    lines = [head, "-" * len(head)]

    def fmt(v):
        return f"{'-':>10}" if v is None else f"{v:>10.3f}"

    for s in subjects:
        name = f"{s['id']} {s['vendor']} {s['echoes']}e {int(s['tilt_deg'])}deg"
        for m in METHODS:
            d = s[m]
            lines.append(f"{name:<26}{m:<5}" + "".join(fmt(d[k]) for _, k in cols)
                         + f"{str(d['calcifications_all_negative']):>8}{d['timings_s']['total']:>7.1f}")
    for m in METHODS:
        d = summary["means"][m]
        lines.append(f"{'MEAN':<26}{m:<5}" + "".join(fmt(d[k]) for _, k in cols)
                     + f"{str(d['calcifications_all_negative']):>8}{d['total_s']:>7.1f}")
    lines.append("")
    for k, v in summary["done_when"].items():
        lines.append(f"done-when {k}: {v['value']} ({v.get('target', 'all')}) -> {'MET' if v['met'] else 'NOT MET'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxel-mm", type=float, default=1.5)
    ap.add_argument("--subjects", type=int, default=len(COHORT))
    ap.add_argument("--out", type=Path, default=Path("bench/results/qsm.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bg-method", choices=BG_METHODS, default="vsharp",
                    help="background field removal of both chains (bench/bgremove.py compares them)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    subjects = []
    with tempfile.TemporaryDirectory() as tmp:
        for entry in COHORT[: a.subjects]:
            subjects.append(run_subject(entry, a.voxel_mm, Path(tmp), a.bg_method))
            print(f"{entry['id']} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarise(subjects)
    result = {
        "simulated": True,
        "description": "QSM accuracy on simulated subjects through vendor DICOM; TKD and STAR-QSM in the same run",
        "command": "python -m bench.qsm " + " ".join(argv or []),
        "voxel_mm": a.voxel_mm, "bg_method": a.bg_method, "torch_threads": a.threads, "host": platform.node(),
        "load_average_at_end": [round(x, 2) for x in __import__("os").getloadavg()],
        "metric_definitions": "core/qsm/metrics.py (QSM-CI 0.6.2 nRMSE/HFEN/XSIM, checked against the package); evaluation mask = eroded mask & true brain mask",
        "subjects": subjects, **summary, "wall_s": _r(time.perf_counter() - t0, 1),
    }
    print(table(subjects, summary))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
