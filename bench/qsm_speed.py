"""QSM chain speed: seconds per step and peak memory for a 200 x 230 x 110 x 4-echo study.

    python -m bench.qsm_speed [--shape 200 230 110] [--spacing 1 1 1.2] [--repeats 2] [--threads 2]

The study is :func:`core.qsm.phantom.head_phantom` (synthetic head with air/bone, veins, lesions;
4 echoes) on a 200 x 230 x 110 grid of 1 x 1 x 1.2 mm. Each method (STAR-QSM, TKD) runs in a fresh
subprocess so that its peak resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which
sees numpy and torch allocations, unlike tracemalloc) belongs to that method alone. Building the
phantom needs more memory than the chain, so after building it the peak is reset (Linux
``/proc/self/clear_refs`` = 5) and ``peak_rss_mib`` is the process's VmHWM during the chain runs;
``baseline_rss_mib`` (interpreter, imports, the input echoes) is the RSS just before.
The first repeat includes torch's FFT plan warm-up; ``best_s`` is the fastest repeat.
A GPU section runs only when ``torch.cuda.is_available()``.
Results go to ``bench/results/qsm_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM; Linux >= 4.0, ``clear_refs`` value 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def worker(method: str, shape: list[int], spacing: list[float], repeats: int, threads: int,
           device: str | None) -> dict:
    """Runs in the child process: build the study, run the chain ``repeats`` times."""
    import numpy as np
    import torch

    from core.geometry import Geometry
    from core.qsm.phantom import head_phantom
    from core.qsm.pipeline import reconstruct

    torch.set_num_threads(threads)
    geom = Geometry.oblique(shape, spacing, 0.0)
    p = head_phantom(shape, spacing, b0_direction=geom.b0_direction_ijk())
    mag = np.ascontiguousarray(p.magnitude, dtype=np.float32)
    ph = np.ascontiguousarray(p.phase_rad, dtype=np.float32)
    te, b0t = list(p.echo_times_s), float(p.field_strength_t)
    del p
    import gc

    gc.collect()
    after_phantom_peak = _maxrss_mib()
    reset = _reset_peak()
    base = _hwm_mib()
    runs = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = reconstruct(mag, ph, te, b0t, geom, method=method, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append({k: round(v, 3) for k, v in r.timings_s.items()})
    out = {
        "method": method, "device": device or "cpu", "torch_threads": torch.get_num_threads(),
        "shape": shape, "echoes": int(mag.shape[0]), "spacing_mm": spacing, "runs_s": runs,
        "best_s": min(runs, key=lambda d: d["total"]),
        "peak_rss_mib": round(_hwm_mib() if reset else _maxrss_mib(), 1),
        "baseline_rss_mib": round(base, 1) if base is not None else None,
        "peak_rss_building_phantom_mib": round(after_phantom_peak, 1),
        "peak_is_chain_only": reset,
        "input_mib": round((mag.nbytes + ph.nbytes) / 2**20, 1),
    }
    if device == "cuda":
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def _spawn(method: str, a: argparse.Namespace, device: str | None) -> dict:
    cmd = [sys.executable, "-m", "bench.qsm_speed", "--worker", method,
           "--shape", *map(str, a.shape), "--spacing", *map(str, a.spacing),
           "--repeats", str(a.repeats), "--threads", str(a.threads)]
    if device:
        cmd += ["--device", device]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = round(time.perf_counter() - t, 1)
    return res


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[200, 230, 110])
    ap.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.2])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--worker", choices=["star", "tkd"], default=None)
    ap.add_argument("--out", type=Path, default=Path("bench/results/qsm_speed.json"))
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.worker, a.shape, a.spacing, a.repeats, a.threads, a.device)))
        return None
    import torch

    results = {"cpu": [_spawn(m, a, None) for m in ("star", "tkd")]}
    if torch.cuda.is_available():
        results["cuda"] = [_spawn(m, a, "cuda") for m in ("star", "tkd")]
    out = {
        "simulated": True, "host": platform.node(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "note": "the 2 cores are shared with other jobs; a load average above 2 inflates the times",
        "command": "python -m bench.qsm_speed " + " ".join(argv or []),
        "target": "full chain <= 15 s (STAR, 200 x 230 x 110 x 4 echoes, 2 CPU threads)",
        "results": results,
    }
    star = results["cpu"][0]["best_s"]["total"]
    out["target_met"] = star <= 15.0
    steps = ["mask", "unwrap", "echo_fit", "vsharp", "star", "tkd", "total"]
    print(f"{'device':<6}{'method':<7}" + "".join(f"{s:>9}" for s in steps) + f"{'peakMiB':>9}{'baseMiB':>9}")
    for dev, rs in results.items():
        for r in rs:
            b = r["best_s"]
            print(f"{dev:<6}{r['method']:<7}" + "".join(f"{b[s]:>9.2f}" if s in b else f"{'-':>9}" for s in steps)
                  + f"{r['peak_rss_mib']:>9.0f}{r['baseline_rss_mib']:>9.0f}")
    print(f"target (STAR total <= 15 s): {'MET' if out['target_met'] else 'NOT MET'} ({star:.2f} s)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
