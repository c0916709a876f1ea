"""Run the product's detection chain over a cohort, for :mod:`training.evaluate`.

    python -m training.predict --cohort DIR --out PREDS [-m MODELS] [--subjects sub-000 ...]

For every ``DIR/<subject>/dicom`` (the simulator's layout, or a hospital cohort laid out the same
way) this does what the app does, with the same functions its operators call: read the DICOM
(:func:`core.dicom.reader.load_gre`), reconstruct QSM (:func:`core.qsm.pipeline.reconstruct`),
detect (:class:`core.detect.detector.CMBDetector`), localise (:func:`operators.mars_localizer.localize_study`)
and write ``PREDS/<subject>/findings.json`` and ``stages.json`` (stage by stage candidates for the
paper-style tables). It skips the DICOM reports and runs in one process, which saves the
framework start-up per subject; ``python -m app`` on the same folder gives the same findings.
Seconds per subject and per stage go to ``PREDS/<subject>/detection.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from app.app import ALGORITHM_VERSION, detection_version


def predict_subject(dicom_dir: Path, out_dir: Path, detector, *, with_resnet: bool = True,
                    algorithm_version: str = ALGORITHM_VERSION) -> dict:
    """Findings, stages and timings for one study; returns the timing record."""
    from core.dicom.reader import load_gre
    from core.qsm.pipeline import reconstruct
    from operators.mars_localizer import localize_study

    t0 = time.perf_counter()
    gre = load_gre(dicom_dir)
    t_load = time.perf_counter() - t0
    qsm = reconstruct(gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.field_strength_t, gre.geometry)
    t_qsm = time.perf_counter() - t0 - t_load
    result = detector.detect_stages(qsm.chi_ppm, qsm.mask, gre.geometry,
                                    study_instance_uid=gre.study_instance_uid,
                                    algorithm_version=algorithm_version, with_resnet=with_resnet)
    t1 = time.perf_counter()
    findings, reg, _ = localize_study(gre, qsm, result.findings)
    t_loc = time.perf_counter() - t1
    out_dir.mkdir(parents=True, exist_ok=True)
    findings.save(out_dir / "findings.json")
    (out_dir / "stages.json").write_text(json.dumps(result.stages_json(), indent=1) + "\n")
    record = {"seconds": {"load": round(t_load, 2), "qsm": round(t_qsm, 2),
                          **{k: round(float(v), 2) for k, v in result.timings_s.items()},
                          "localise": round(t_loc, 2), "total": round(time.perf_counter() - t0, 2)},
              "n_microbleeds": len(findings.microbleeds), "n_mimics": len(findings.mimics)}
    (out_dir / "detection.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.predict", description=__doc__.splitlines()[0])
    p.add_argument("--cohort", type=Path, required=True, help="folder with <subject>/dicom")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-m", "--models", type=Path, default=None, help="model folder (default: models/)")
    p.add_argument("--subjects", nargs="*", help="only these subjects")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet comparator stage")
    args = p.parse_args(argv)
    from core.detect.detector import CMBDetector
    from core.errors import CMBError
    from operators.cmb_detector import resolve_model_dir

    try:
        detector = CMBDetector.load(resolve_model_dir(args.models))
    except CMBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    subjects = sorted(d.name for d in args.cohort.iterdir() if (d / "dicom").is_dir())
    if args.subjects:
        subjects = [s for s in subjects if s in set(args.subjects)]
    if not subjects:
        print(f"error: no <subject>/dicom folders under {args.cohort}", file=sys.stderr)
        return 2
    version = detection_version(args.models)
    for s in subjects:
        rec = predict_subject(args.cohort / s / "dicom", args.out / s, detector, with_resnet=not args.no_resnet,
                              algorithm_version=version)
        print(f"{s}: {rec['n_microbleeds']} microbleed(s), {rec['n_mimics']} mimic(s), "
              f"{rec['seconds']['total']:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
