"""Cohort benchmark: ``training.predict`` over one simulated cohort, in one run, sequentially in one
process (what the command did before ``--cluster``) and on a Dask LocalCluster with 1 and with 2
worker processes.

    python -m bench.cohort [--subjects 10] [--voxel-mm 3 3 3] [--workers 1 2] [--threads 1]
        [--out bench/results/cohort.json]

Each mode runs the same command line (``python -m training.predict --cohort C --out O
--no-progress --threads T [--cluster local:N]``) as a separate process on the same cohort into its
own output folder, and the wall time of that process is reported (start-up, the cluster's start
and the detector's loading included: what a user waits for). ``--threads 1`` for every mode, so the
sequential run and a one-worker cluster do the same work and the 2-worker run can use 2 cores.
The findings of every mode are compared with the sequential run's (``findings.json`` and
``stages.json`` byte for byte per subject): ``identical_to_sequential`` says whether they are.

The machine's load average before and after each mode is recorded: on a shared machine the
speed-up is only as good as the free cores. Studies are simulated (training.simulate), so say so
when quoting the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, write_result

PY = sys.executable
COMPARED = ("findings.json", "stages.json")


def simulate_cohort(root: Path, subjects: int, voxel_mm: list[float], seed: int) -> Path:
    cohort = root / "cohort"
    subprocess.run([PY, "-m", "training.simulate", "--out", str(cohort), "--subjects", str(subjects),
                    "--seed", str(seed), "--voxel-mm", *[str(v) for v in voxel_mm]],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return cohort


def run_predict(cohort: Path, out: Path, threads: int, cluster: str | None) -> dict[str, Any]:
    cmd = [PY, "-m", "training.predict", "--cohort", str(cohort), "--out", str(out), "--no-progress",
           "--threads", str(threads)] + (["--cluster", cluster] if cluster else [])
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"training.predict {'--cluster ' + cluster if cluster else ''} failed "
                         f"({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    subject_s = []
    for rec in sorted(out.glob("*/detection.json")):
        subject_s.append(float(json.loads(rec.read_text()).get("seconds", {}).get("total", 0.0)))
    return {"mode": cluster or "sequential (in process)", "wall_s": round(wall, 2),
            "subjects_done": len(subject_s),
            # the subjects' own seconds (detection.json): wall minus these / workers is start-up
            # (process, cluster, imports, detector loading) and scheduling
            "subject_seconds": [round(x, 2) for x in subject_s],
            "subject_seconds_sum": round(sum(subject_s), 2),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}


def same_outputs(a: Path, b: Path) -> bool:
    subjects = sorted(p.name for p in a.iterdir() if p.is_dir())
    if subjects != sorted(p.name for p in b.iterdir() if p.is_dir()):
        return False
    return all((a / s / f).read_bytes() == (b / s / f).read_bytes() for s in subjects for f in COMPARED)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cohort", description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", type=int, default=10)
    ap.add_argument("--voxel-mm", type=float, nargs=3, default=[3.0, 3.0, 3.0])
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep the cohort and outputs here")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "cohort.json")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_cohort_"))
    try:
        t = time.perf_counter()
        cohort = simulate_cohort(work, args.subjects, args.voxel_mm, args.seed)
        sim_s = time.perf_counter() - t
        runs = []
        seq_out = work / "pred-sequential"
        runs.append(run_predict(cohort, seq_out, args.threads, None))
        for n in args.workers:
            out = work / f"pred-local-{n}"
            r = run_predict(cohort, out, args.threads, f"local:{n}")
            r["identical_to_sequential"] = same_outputs(seq_out, out)
            runs.append(r)
        seq = runs[0]["wall_s"]
        for r in runs:
            r["speedup_vs_sequential"] = round(seq / r["wall_s"], 2) if r["wall_s"] else None
        result = {
            "simulated": True,
            "cohort": f"training.simulate --subjects {args.subjects} --seed {args.seed} "
                      f"--voxel-mm {' '.join(f'{v:g}' for v in args.voxel_mm)}",
            "simulate_s": round(sim_s, 1),
            "threads_per_subject": args.threads,
            "runs": runs,
        }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    write_result(args.out, result, echo=False)
    for r in runs:
        print(f"{r['mode']:<24s} {r['wall_s']:7.1f} s  x{r['speedup_vs_sequential']}  "
              f"identical={r.get('identical_to_sequential', '-')}  load {r['load_before']}->{r['load_after']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
