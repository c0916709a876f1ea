"""Detection per phantom family: the committed detector scored on cohorts of each family, one run.

    python -m bench.detection_family \\
        --cohort randomised D/rand D/rand_preds bench/results/detection_randomised.json \\
        --cohort default    D/def  D/def_preds  bench/results/detection_default_seed12512.json \\
        [--pipeline-command "python -m training.simulate ..."] ...

Each ``--cohort FAMILY TRUTH PREDICTIONS OUT`` is scored with :func:`training.evaluate.evaluate`
(the same report as ``bench/results/detection.json``: stage tables, sensitivity per size class and
MARS region, FP per subject, controls, calcifications reported as microbleeds, FROC) and written to
OUT through :func:`bench.common.write_result`, with, added:

* ``family`` and each subject's acquisition from ``TRUTH/cohort.json`` (voxel, echo times, B0, SNR);
* ``by_acquisition``: final-output sensitivity per field strength, number of echoes, in-plane
  voxel class, SNR class, lesion shape and lesion chi class (small groups: read with their ``n``);
* ``comparison``: sensitivity and FP per subject of every cohort in this run;
* ``model``: the detection version (code + ``models/detector.json`` digest) that made the
  predictions, and ``notes``.

It scores predictions made beforehand (``training.predict``); it runs no detector itself. Every
figure is on simulated data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import write_result
from training import evaluate as E
from training import metrics as M

NOTES = ("All data SIMULATED (training.simulate). Predictions by the current committed detector "
         "(models/, trained on the default phantom family only); not retrained on the randomised family: "
         "this is the current model's generalisation measurement across phantom families. Cohorts of the "
         "same seed are paired (same subject seeds, so the same anatomy draws and lesion counts; lesion "
         "positions, sizes and everything the randomised family draws differ). Randomised voxels over the "
         "full 0.5-1.5 mm range under the 16e6-voxel matrix cap (training.sim.family), not narrowed to 1 mm.")


def _class(value: float, edges: list[float], fmt: str) -> str:
    lo = None
    for e in edges:
        if value < e:
            return (f"<{e:{fmt}}" if lo is None else f"{lo:{fmt}}-{e:{fmt}}")
        lo = e
    return f">={lo:{fmt}}"


def acquisition_of(truth: dict) -> dict:
    acq = truth.get("acquisition", {})
    sp = truth.get("geometry", {}).get("spacing_mm", [None] * 3)
    return {"field_strength_t": acq.get("field_strength_t"), "n_echoes": len(acq.get("echo_times_s", [])),
            "echo_times_ms": [round(1e3 * t, 2) for t in acq.get("echo_times_s", [])],
            "snr": round(float(acq.get("snr", 0.0)), 2), "voxel_mm": sp}


def by_acquisition(truth: dict[str, dict], preds: dict[str, dict | None]) -> dict[str, dict]:
    """Final-output sensitivity grouped by subject acquisition and by lesion shape / chi."""
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for sub, t in truth.items():
        lesions = [le for le in t.get("lesions", []) if le.get("kind", "cmb") == "cmb"]
        r = M.evaluate_subject(sub, (preds.get(sub) or {}).get(E.FINAL, []), t.get("lesions", []),
                               control=bool(t.get("control", False)))
        hit = {j for _, j, _ in r.match.tp}
        a = acquisition_of(t)
        subject_keys = {
            "field_strength_t": f"{a['field_strength_t']:g} T",
            "n_echoes": str(a["n_echoes"]),
            "voxel_inplane_mm": _class(float(a["voxel_mm"][0]), [0.8, 1.2], ".1f"),
            "snr": _class(a["snr"], [25.0, 45.0], ".0f"),
        }
        for j, le in enumerate(lesions):
            keys = dict(subject_keys, lesion_shape=(le.get("shape") or {}).get("kind", "sphere"),
                        lesion_chi_ppm=_class(float(le["chi_ppm"]), [0.3, 1.0, 1.5], ".1f"))
            for k, g in keys.items():
                groups[k][g][0] += 1
                groups[k][g][1] += j in hit
    return {k: {g: {"n": n, "tp": tp, "sensitivity": round(tp / n, 6) if n else None}
                for g, (n, tp) in sorted(v.items())} for k, v in groups.items()}


def score(family: str, truth_dir: Path, pred_dir: Path) -> dict[str, Any]:
    report = E.evaluate(pred_dir, truth_dir)
    truth = E.load_truth(truth_dir)
    preds = {s: E.load_predictions(pred_dir, s) for s in truth}
    families = sorted({t.get("family", "default") for t in truth.values()})
    if families != [family]:
        raise SystemExit(f"error: {truth_dir} holds families {families}, not {family!r}")
    versions = set()
    for s in truth:
        f = pred_dir / s / "detection.json"
        if f.is_file():
            versions.add(json.loads(f.read_text()).get("algorithm_version"))
    cohort_file = truth_dir / "cohort.json"
    cohort = json.loads(cohort_file.read_text()) if cohort_file.is_file() else {}
    return {
        "benchmark": "detection_family",
        "data": "simulated" if report["simulated"] else "not all simulated",
        "family": family,
        "cohort_seed": cohort.get("seed"),
        "cohort_options": {k: v for k, v in cohort.get("options", {}).items() if k != "out"},
        "model": {"detection_versions": sorted(v for v in versions if v), "retrained": False},
        "notes": NOTES,
        **report,
        "by_acquisition": by_acquisition(truth, preds),
        "acquisitions": {s: acquisition_of(t) for s, t in truth.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.detection_family", description=__doc__.splitlines()[0])
    ap.add_argument("--cohort", nargs=4, action="append", required=True,
                    metavar=("FAMILY", "TRUTH", "PREDICTIONS", "OUT"))
    ap.add_argument("--pipeline-command", action="append", default=[],
                    help="a command that made the cohorts / predictions (recorded)")
    a = ap.parse_args(argv)
    reports = [(Path(out), score(fam, Path(t), Path(p))) for fam, t, p, out in a.cohort]
    comparison = {r["family"]: {"n_subjects": r["n_subjects"], "n_reference_cmb": r["n_reference_cmb"],
                                **{k: r["stages"][E.FINAL]["counts"][k] for k in ("sensitivity", "fp_per_subject")},
                                "calcifications_reported_as_cmb": r["stages"][E.FINAL]["calcifications"]}
                  for _, r in reports}
    for out, r in reports:
        r["comparison"] = comparison
        r["pipeline_commands"] = a.pipeline_command
        write_result(out, r, echo=False)
        print(f"wrote {out}")
    print(json.dumps(comparison, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
