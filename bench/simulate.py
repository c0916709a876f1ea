"""Benchmark: seconds per simulated subject (phantom + field + GRE, DICOM writing), per vendor.

    python bench/simulate.py [--subjects 3] [--voxel-mm 1 1 1] [--echoes 4]

Writes bench/results/simulate.json. Measured on simulated data, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.sim.dicom_writer import write_study  # noqa: E402
from training.sim.phantom import simulate_subject  # noqa: E402
from training.sim.truth import write_truth  # noqa: E402
from training.simulate import VENDORS, multi_echo_times, subject_seed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--voxel-mm", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    p.add_argument("--echoes", type=int, default=4)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "simulate.json")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.subjects):
            vendor = VENDORS[i % len(VENDORS)]
            t0 = time.perf_counter()
            study = simulate_subject(f"bench-{i:03d}", subject_seed(args.seed, i), voxel_mm=tuple(args.voxel_mm),
                                     echo_times_s=multi_echo_times(args.echoes))
            t1 = time.perf_counter()
            files = write_study(study, Path(tmp) / f"s{i}" / "dicom", vendor)
            write_truth(study, Path(tmp) / f"s{i}" / "truth")
            t2 = time.perf_counter()
            rows.append({"subject": i, "vendor": vendor, "shape": list(study.geometry.shape),
                         "echoes": args.echoes, "n_files": len(files),
                         "seconds_simulate": round(t1 - t0, 2), "seconds_write": round(t2 - t1, 2),
                         "seconds_total": round(t2 - t0, 2)})
            print(json.dumps(rows[-1]), flush=True)
    total = [r["seconds_total"] for r in rows]
    result = {"benchmark": "simulate", "data": "simulated", "machine": platform.processor() or platform.machine(),
              "voxel_mm": list(args.voxel_mm), "echoes": args.echoes, "subjects": rows,
              "mean_seconds_per_subject": round(sum(total) / len(total), 2), "max_seconds_per_subject": max(total)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"mean {result['mean_seconds_per_subject']} s/subject, max {result['max_seconds_per_subject']} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
