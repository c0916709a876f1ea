"""Benchmark: seconds per subject for detection stage I and stage II, with the FRST variants side by side.

    python bench/detect_speed.py [--subjects 2] [--voxel-mm 1 1 1] [--repeat 2] [--device cpu|cuda]
        [--threads 2] [--out bench/results/detect_speed.json]

Per simulated subject (multi-echo, 1 mm by default; simulation and QSM are not timed): the QSM is
reconstructed by the product's chain (:func:`core.qsm.pipeline.reconstruct`), then the shipped
detector (``models/``) runs ``--repeat`` times and the median of each stage's seconds is kept
(:meth:`core.detect.detector.CMBDetector.detect_stages` timings: stage I, ConvScreen, V-Net, ResNet,
segmentation + suppression). In the same run and on the same QSM, for the paper's Figure 7
comparison: the 2.5D FRST as stage I computes it (:func:`core.detect.stage1.frst_25d_geomean`) and
the 3D FRST (:func:`core.detect.frst.frst_3d`), both on the mask's bounding box with stage I's radii.

Results go to ``--out`` as JSON (simulated data, this machine; the host and load are recorded, as
these machines are shared and noisy). ``--device cuda`` times the networks on a GPU where one
exists (stage I is numpy/scipy and stays on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import median_seconds  # noqa: E402
from core.detect.detector import CMBDetector  # noqa: E402
from core.detect.frst import frst_3d  # noqa: E402
from core.detect.stage1 import Stage1Params, frst_25d_geomean  # noqa: E402
from core.qsm._fft import mask_bbox  # noqa: E402
from core.qsm.pipeline import reconstruct  # noqa: E402
from training.sim.phantom import DEFAULT_ECHO_TIMES_S, simulate_subject  # noqa: E402

STAGE_KEYS = ("stage1_s", "conv_s", "vnet_s", "resnet_s", "segment_s", "total_s")


def bench_subject(seed: int, voxel_mm: float, detector: CMBDetector, repeat: int) -> dict:
    study = simulate_subject(f"speed-{seed}", seed, voxel_mm=(voxel_mm,) * 3,
                             echo_times_s=list(DEFAULT_ECHO_TIMES_S), n_cmb=8)
    acq = study.acquisition
    qsm = reconstruct(study.magnitude, study.phase_rad, acq.echo_times_s, acq.field_strength_t, study.geometry)
    runs = []
    for _ in range(repeat):
        res = detector.detect_stages(qsm.chi_ppm, qsm.mask, study.geometry, study_instance_uid="1.2.3",
                                     algorithm_version="bench", with_resnet=True)
        runs.append(res)
    stage_s = {k: round(statistics.median(r.timings_s.get(k, 0.0) for r in runs), 3) for k in STAGE_KEYS}
    stage_s["stage2_s"] = round(stage_s["conv_s"] + stage_s["vnet_s"] + stage_s["resnet_s"]
                                + stage_s["segment_s"], 3)
    p = Stage1Params()
    box = mask_bbox(qsm.mask, (0, 0, 0))
    chi_box = np.ascontiguousarray(qsm.chi_ppm[box])
    sp = study.geometry.spacing
    frst = {
        "frst_25d_s": round(median_seconds(lambda: frst_25d_geomean(chi_box, sp, p.radii_mm, p.alpha, p.beta), repeat), 3),
        "frst_3d_s": round(median_seconds(lambda: frst_3d(chi_box, sp, p.radii_mm, p.alpha, p.beta), repeat), 3),
        "box_shape": list(chi_box.shape),
    }
    return {"seed": seed, "shape": list(study.geometry.shape), "voxel_mm": voxel_mm,
            "n_candidates": len(runs[0].stages["stage1"]), "n_survivors": len(runs[0].stages["conv"]),
            "n_microbleeds": len(runs[0].findings.microbleeds), "seconds": stage_s, "frst": frst}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/detect_speed.py", description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7100)
    ap.add_argument("--voxel-mm", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", type=Path, default=REPO / "models")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "detect_speed.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    detector = CMBDetector.load(a.models, device=a.device)
    t0 = time.perf_counter()
    subjects = [bench_subject(a.seed + i, a.voxel_mm, detector, a.repeat) for i in range(a.subjects)]

    def mean(path: tuple[str, str]) -> float:
        return round(float(np.mean([s[path[0]][path[1]] for s in subjects])), 3)

    summary = {k: mean(("seconds", k)) for k in (*STAGE_KEYS, "stage2_s")}
    summary["stage1_plus_2_s"] = summary["total_s"]
    summary["frst_25d_s"] = mean(("frst", "frst_25d_s"))
    summary["frst_3d_s"] = mean(("frst", "frst_3d_s"))
    report = {
        "simulated": True,
        "description": "detection seconds per simulated subject (median of repeats), shipped models",
        "command": "python bench/detect_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "device": a.device if a.device == "cpu" else f"{a.device} ({torch.cuda.get_device_name(0)})",
        "torch_threads": a.threads,
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_at_end": list(os.getloadavg()),
        "decision_rule": detector.config.decision_rule,
        "subjects": subjects,
        "mean": summary,
        "target": {"stage1_plus_2_s": "<= 20 s per subject on the 2-core CPU",
                   "met": summary["stage1_plus_2_s"] <= 20.0},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'seed':>6} {'stage I':>8} {'conv':>6} {'V-Net':>6} {'ResNet':>6} {'segm.':>6} {'total':>6} "
          f"{'2.5D FRST':>9} {'3D FRST':>8}")
    for s in subjects:
        c, f = s["seconds"], s["frst"]
        print(f"{s['seed']:>6} {c['stage1_s']:>8.2f} {c['conv_s']:>6.2f} {c['vnet_s']:>6.2f} {c['resnet_s']:>6.2f} "
              f"{c['segment_s']:>6.2f} {c['total_s']:>6.2f} {f['frst_25d_s']:>9.2f} {f['frst_3d_s']:>8.2f}")
    print(json.dumps({"mean": summary, "target_met": report["target"]["met"]}))
    return report


if __name__ == "__main__":
    main()
