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

    python -m training.predict ... [--cluster local[:N] | --cluster tcp://HOST:PORT] [--threads T] [--redo]

``--cluster`` runs one task per subject on a Dask cluster (:mod:`training.cluster`, which also says
how workers are started on SLURM or Kubernetes); without it the subjects run one after the other
here. Either way a subject is skipped when its three files are complete and ``detection.json``
records the same algorithm version (code + model digest) and ResNet setting (``--redo`` runs it
again), every file is written to a temporary name and moved into place, and a failing subject is
reported (id + one-line error) while the others go on; the exit status is 1 when any failed.
``--threads``: torch threads per subject (default: torch's own in this process, 1 per cluster
worker, whose process has one thread); the same value gives the same findings either way.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

from app.app import ALGORITHM_VERSION, detection_version
from training.cluster import (ClusterSpecError, add_cohort_arguments, check_cohort_arguments, run_subjects,
                              summarise, write_text_atomic)

OUTPUTS = ("findings.json", "stages.json", "detection.json")  # detection.json is written last
_DETECTORS: dict[str, object] = {}  # model folder -> CMBDetector, loaded once per process (worker)


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
    write_text_atomic(out_dir / "findings.json", json.dumps(findings.to_json(), indent=2) + "\n")
    write_text_atomic(out_dir / "stages.json", json.dumps(result.stages_json(), indent=1) + "\n")
    record = {"seconds": {"load": round(t_load, 2), "qsm": round(t_qsm, 2),
                          **{k: round(float(v), 2) for k, v in result.timings_s.items()},
                          "localise": round(t_loc, 2), "total": round(time.perf_counter() - t0, 2)},
              "n_microbleeds": len(findings.microbleeds), "n_mimics": len(findings.mimics),
              "algorithm_version": algorithm_version, "with_resnet": bool(with_resnet)}
    write_text_atomic(out_dir / "detection.json", json.dumps(record, indent=2) + "\n")
    return record


def _detector(model_dir: Path):
    """The detector of ``model_dir``, loaded once per process (a cluster worker keeps it)."""
    from core.detect.detector import CMBDetector

    key = str(Path(model_dir).resolve())
    if key not in _DETECTORS:
        _DETECTORS[key] = CMBDetector.load(Path(model_dir))
    return _DETECTORS[key]


def completed_record(out_dir: Path, algorithm_version: str, with_resnet: bool) -> dict | None:
    """``detection.json`` of a finished subject run with this version and ResNet setting, else None."""
    if not all((out_dir / f).is_file() for f in OUTPUTS):
        return None
    try:
        rec = json.loads((out_dir / "detection.json").read_text())
    except (OSError, ValueError):
        return None
    if rec.get("algorithm_version") != algorithm_version or rec.get("with_resnet") != bool(with_resnet):
        return None
    return rec


def predict_task(subject: str, *, cohort: Path, out: Path, model_dir: Path, with_resnet: bool,
                 algorithm_version: str, threads: int | None) -> dict:
    """One subject as a cluster (or in-process) task: paths in, ``detection.json``'s record out."""
    if threads:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return predict_subject(cohort / subject / "dicom", out / subject, _detector(model_dir),
                           with_resnet=with_resnet, algorithm_version=algorithm_version)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.predict", description=__doc__.splitlines()[0])
    p.add_argument("--cohort", type=Path, required=True, help="folder with <subject>/dicom")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("-m", "--models", type=Path, default=None, help="model folder (default: models/)")
    p.add_argument("--subjects", nargs="*", help="only these subjects")
    p.add_argument("--no-resnet", action="store_true", help="skip the ResNet comparator stage")
    add_cohort_arguments(p, "run subjects whose outputs are already complete")
    args = p.parse_args(argv)
    check_cohort_arguments(p, args)
    from core.errors import CMBError
    from operators.cmb_detector import resolve_model_dir

    model_dir = resolve_model_dir(args.models).resolve()
    try:
        _detector(model_dir)  # a missing or broken model folder stops here, before any subject
    except CMBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.cohort.is_dir():
        print(f"error: cohort folder {args.cohort} does not exist", file=sys.stderr)
        return 2
    subjects = sorted(d.name for d in args.cohort.iterdir() if (d / "dicom").is_dir())
    if args.subjects:
        subjects = [s for s in subjects if s in set(args.subjects)]
    if not subjects:
        print(f"error: no <subject>/dicom folders under {args.cohort}", file=sys.stderr)
        return 2
    version = detection_version(model_dir)
    with_resnet = not args.no_resnet
    threads = args.threads if args.threads is not None else (1 if args.cluster is not None else None)
    task = functools.partial(predict_task, cohort=args.cohort.resolve(), out=args.out.resolve(),
                             model_dir=model_dir, with_resnet=with_resnet, algorithm_version=version,
                             threads=threads)

    def completed(s: str) -> dict | None:
        return None if args.redo else completed_record(args.out / s, version, with_resnet)

    def describe(s: str, rec: dict) -> str:
        return (f"{s}: {rec['n_microbleeds']} microbleed(s), {rec['n_mimics']} mimic(s), "
                f"{rec['seconds']['total']:.1f} s")

    try:
        outcomes = run_subjects(subjects, task, completed=completed, cluster=args.cluster, describe=describe,
                                progress=not args.no_progress)
    except ClusterSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return summarise(outcomes)


if __name__ == "__main__":
    sys.exit(main())
