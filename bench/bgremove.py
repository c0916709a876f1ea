"""Background field removal, V-SHARP / PDF / LBV side by side, on validation data only.

    python -m bench.bgremove [--out bench/results/bgremove.json] [--methods vsharp pdf lbv]
                             [--sim-seeds 4101 4102 4103] [--voxel-mm 1.5] [--no-qsm-forward]

Cases (none of them is used to train or to test anything else):

* qsm-forward's "simple" phantom (independent code, pinned in requirements-dev.txt): 100^3 at 1 mm,
  3 T and 7 T, QSM-CI's echoes 4/12/20/28 ms, peak SNR 100 (as tests/integration/
  test_qsm_forward_phantom.py). qsm-forward writes its own true local field (``--save-field``:
  ``fieldmap-local``, the field of chi inside its mask); note that its simulated shimming subtracts a
  2nd-order polynomial fit (not all harmonic) from the total field, so no background method can
  reach 0 against it.
* our simulator (:func:`training.sim.phantom.simulate_subject`) with seeds 4101-4103 at 1.5 mm, 4
  echoes (default TEs), 3 T: seeds outside bench/qsm.py (3101-3106) and the training cohorts
  (hashed per-subject seeds); arrays go straight into the chain (no DICOM round trip: that is
  bench/qsm.py's job).

For each case every method runs the whole chain (:func:`core.qsm.pipeline.reconstruct`, STAR-QSM)
on the same input, changing only ``bg_method``. All three methods return the same eroded mask
(checked), so every figure is over the same voxels. Metrics (QSM-CI 0.6.2 definitions,
core.qsm.metrics): local-field nRMSE (%) against (a) the field of the true chi inside the eroded
mask (what a background method given that mask can at best recover; the definition bench/qsm.py
uses) and, for qsm-forward, (b) its own ``fieldmap-local``; chi nRMSE / HFEN (%) and XSIM over the
eroded mask (& true brain mask for the simulator) against the truth; background-removal seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from core import physics
from core.geometry import Geometry
from core.qsm import metrics as M
from core.qsm.pipeline import BG_METHODS, reconstruct
from training.sim.phantom import DEFAULT_ECHO_TIMES_S, simulate_subject

QSM_FORWARD_TES = (0.004, 0.012, 0.020, 0.028)


def _r(x: float, n: int = 2) -> float:
    return float(round(float(x), n))


def qsm_forward_exe() -> str:
    exe = Path(sys.executable).with_name("qsm-forward")
    if exe.exists():
        return str(exe)
    found = shutil.which("qsm-forward")
    if not found:
        raise SystemExit("error: qsm-forward is not installed (pip install -r requirements-dev.txt)")
    return found


def qsm_forward_case(root: Path, b0_t: float, snr: float = 100.0) -> dict:
    """Simulate and load qsm-forward's simple phantom; the true local field comes from qsm-forward."""
    import nibabel as nib

    cmd = [qsm_forward_exe(), "simple", str(root), "--B0", str(b0_t), "--TEs", *map(str, QSM_FORWARD_TES),
           "--peak-snr", str(snr), "--save-field"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    a = root / "sub-1" / "anat"
    d = root / "derivatives" / "qsm-forward" / "sub-1" / "anat"
    load = lambda p: np.asarray(nib.load(p).get_fdata(), dtype=np.float32)  # noqa: E731
    side = json.loads((a / "sub-1_echo-1_part-phase_MEGRE.json").read_text())
    mask = load(d / "sub-1_mask.nii") > 0
    return {
        "id": f"qsm-forward simple {b0_t:g} T", "kind": "qsm-forward",
        "magnitude": np.stack([load(a / f"sub-1_echo-{e}_part-mag_MEGRE.nii") for e in range(1, 5)]),
        "phase": np.stack([load(a / f"sub-1_echo-{e}_part-phase_MEGRE.nii") for e in range(1, 5)]),
        "te": list(QSM_FORWARD_TES), "b0": float(side["MagneticFieldStrength"]),
        "geometry": Geometry.from_parameters(mask.shape, (1.0, 1.0, 1.0)),
        "chi": load(d / "sub-1_Chimap.nii"), "truth_mask": mask, "mask": mask,
        "local_qsm_forward": load(d / "sub-1_fieldmap-local.nii"),
    }


def simulator_case(seed: int, voxel_mm: float) -> dict:
    s = simulate_subject(f"v{seed}", seed, voxel_mm=(voxel_mm,) * 3, echo_times_s=list(DEFAULT_ECHO_TIMES_S))
    return {"id": f"simulator seed {seed} {voxel_mm:g} mm", "kind": "simulator", "seed": seed,
            "magnitude": s.magnitude, "phase": s.phase_rad, "te": list(s.acquisition.echo_times_s),
            "b0": float(s.acquisition.field_strength_t), "geometry": s.geometry, "chi": s.chi_ppm,
            "truth_mask": s.brain_mask, "mask": None}


def run_case(case: dict, methods: list[str]) -> dict:
    geo = case["geometry"]
    rec = {"id": case["id"], "kind": case["kind"], "shape": list(geo.shape), "spacing_mm": list(geo.spacing),
           "b0_t": case["b0"], "echo_times_s": case["te"]}
    eroded = true_local = None
    for m in methods:
        res = reconstruct(case["magnitude"], case["phase"], case["te"], case["b0"], geo, mask=case["mask"],
                          bg_method=m)
        em = res.eroded_mask
        if eroded is None:
            eroded = em
            true_local = physics.forward_field_ppm(np.where(em, case["chi"], 0).astype(np.float32), geo.spacing,
                                                   geo.b0_direction_ijk(), pad_factor=1.5)
        elif not np.array_equal(em, eroded):
            raise RuntimeError(f"{m}: eroded mask differs from {methods[0]}'s; the comparison would be unfair")
        ev = em & case["truth_mask"]
        out = {
            "local_field_nrmse_pct": _r(M.nrmse(res.local_field_ppm, true_local, em)),
            "chi_nrmse_pct": _r(M.nrmse(res.chi_ppm, case["chi"], ev)),
            "chi_hfen_pct": _r(M.hfen(res.chi_ppm, case["chi"], ev)),
            "chi_xsim": _r(M.xsim(res.chi_ppm, case["chi"], ev), 4),
            "bg_removal_s": _r(res.timings_s[m]), "chain_s": _r(res.timings_s["total"]),
        }
        if "local_qsm_forward" in case:
            out["local_field_nrmse_vs_qsm_forward_pct"] = _r(M.nrmse(res.local_field_ppm, case["local_qsm_forward"], em))
        rec[m] = out
        print(f"  {case['id']:<30} {m:<7} " + " ".join(f"{k}={v}" for k, v in out.items()), flush=True)
    rec["eroded_mask_voxels"] = int(eroded.sum())
    return rec


def summarise(cases: list[dict], methods: list[str]) -> dict:
    keys = ["local_field_nrmse_pct", "chi_nrmse_pct", "chi_hfen_pct", "chi_xsim", "bg_removal_s"]
    out = {}
    for kind in ("qsm-forward", "simulator", "all"):
        sel = [c for c in cases if kind == "all" or c["kind"] == kind]
        if sel:
            out[kind] = {m: {k: _r(np.mean([c[m][k] for c in sel]), 4 if k == "chi_xsim" else 2) for k in keys}
                         for m in methods}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/bgremove.json"))
    ap.add_argument("--methods", nargs="+", choices=BG_METHODS, default=list(BG_METHODS))
    ap.add_argument("--sim-seeds", nargs="*", type=int, default=[4101, 4102, 4103])
    ap.add_argument("--voxel-mm", type=float, default=1.5)
    ap.add_argument("--no-qsm-forward", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_qsm_forward:
            for b0 in (3.0, 7.0):
                cases.append(run_case(qsm_forward_case(Path(tmp) / f"qf{b0:g}", b0), a.methods))
    for seed in a.sim_seeds:
        cases.append(run_case(simulator_case(seed, a.voxel_mm), a.methods))
    result = {
        "simulated": True,
        "description": "background field removal (V-SHARP / PDF / LBV) on validation phantoms, whole chain with "
                       "STAR-QSM, only bg_method changes",
        "command": "python -m bench.bgremove " + " ".join(argv if argv is not None else sys.argv[1:]),
        "metric_definitions": "core/qsm/metrics.py (QSM-CI 0.6.2); local field vs the field of the true chi inside "
                              "the eroded mask (same mask for every method); qsm-forward also vs its fieldmap-local",
        "torch_threads": a.threads, "host": platform.node(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "cases": cases, "means": summarise(cases, a.methods), "wall_s": _r(time.perf_counter() - t0, 1),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["means"], indent=1))
    return result


if __name__ == "__main__":
    main()
