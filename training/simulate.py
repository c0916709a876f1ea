"""Simulate a cohort of scanner studies with ground truth.

    python -m training.simulate --out DIR --subjects N --seed S [--controls K]
        [--vendor siemens|philips|ge|mixed] [--echoes E|mixed] [--voxel-mm X Y Z] [--oblique DEG]
        [--enhanced] [--philips-phase-units rad|mrad] [--omit-echo-numbers] [--snr SNR]
        [--family default|randomised] [--voxel-range-mm MIN MAX] [--max-matrix-voxels N]

``--family randomised`` (:mod:`training.sim.family`) draws voxel size, echo times, field strength,
SNR, tissue / vein / lesion susceptibilities, lesion R2* and shapes per subject from its seed;
``--voxel-mm``, ``--echoes``, ``--field-t`` and ``--snr`` are then refused (``--voxel-range-mm``
narrows the voxel draw, ``--max-matrix-voxels`` caps the matrix). The family and each subject's
draws are in ``truth.json`` and ``cohort.json``.

Layout written (one folder per subject)::

    DIR/cohort.json                      what was simulated, per-subject seeds and seconds
    DIR/sub-000/dicom/...                scanner-like DICOM (magnitude + phase, or real + imaginary)
    DIR/sub-000/truth/chi.nii.gz         true susceptibility (ppm, CSF = 0)
    DIR/sub-000/truth/brain_mask.nii.gz  true brain mask
    DIR/sub-000/truth/truth.json         every lesion and mimic (kind, centre LPS mm, voxel, size, chi, MARS)

Deterministic: the same ``--seed`` and options give the same arrays and the same DICOM UIDs. Every
figure measured on these studies is a figure on *simulated* data.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VENDORS = ("siemens", "philips", "ge")
SINGLE_ECHO_TE_S = [0.023]  # the seed paper's single-echo acquisition (Xia et al. 2023)


def multi_echo_times(n: int, first_s: float = 0.006, spacing_s: float = 0.006) -> list[float]:
    """Echo times of an n-echo acquisition (n = 1 gives the seed paper's 23 ms)."""
    if n == 1:
        return list(SINGLE_ECHO_TE_S)
    return [first_s + i * spacing_s for i in range(n)]


def subject_seed(cohort_seed: int, index: int) -> int:
    """Independent, reproducible per-subject seed."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1)[0])


def plan_cohort(n_subjects: int, seed: int, n_controls: int, vendor: str, echoes: str | None) -> list[dict]:
    """What each subject will be: id, seed, control or not, vendor, number of echoes (None: drawn
    by the randomised family)."""
    if not 0 <= n_controls <= n_subjects:
        raise ValueError(f"--controls must be between 0 and --subjects ({n_subjects})")
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(n_subjects):
        v = vendor if vendor != "mixed" else VENDORS[i % len(VENDORS)]
        e = None if echoes is None else (int(echoes) if echoes != "mixed" else (1 if rng.random() < 0.3 else 4))
        plan.append({
            "subject_id": f"sub-{i:03d}",
            "seed": subject_seed(seed, i),
            "control": i >= n_subjects - n_controls,
            "vendor": v,
            "echoes": e,
        })
    return plan


def simulate_one(entry: dict, out: Path, args: argparse.Namespace) -> dict:
    """Simulate, write DICOM and truth for one subject; return its cohort.json record."""
    from training.sim.dicom_writer import write_study
    from training.sim.phantom import simulate_subject
    from training.sim.truth import write_truth

    t0 = time.perf_counter()
    if args.family == "default":
        acquisition = {"voxel_mm": tuple(args.voxel_mm), "echo_times_s": multi_echo_times(entry["echoes"]),
                       "field_strength_t": args.field_t, "snr": args.snr}
    else:  # drawn per subject by the family
        acquisition = {"family_ranges": family_ranges(args)}
    study = simulate_subject(
        entry["subject_id"],
        entry["seed"],
        tilt_deg=args.oblique,
        control=entry["control"],
        family=args.family,
        **acquisition,
    )
    t_sim = time.perf_counter() - t0
    sub_dir = out / entry["subject_id"]
    files = write_study(
        study,
        sub_dir / "dicom",
        entry["vendor"],
        philips_phase_units=args.philips_phase_units,
        omit_echo_numbers=args.omit_echo_numbers,
        enhanced=args.enhanced,
    )
    write_truth(study, sub_dir / "truth")
    seconds = time.perf_counter() - t0
    kinds = [les.kind for les in study.lesions]
    if study.family != "default":  # what was drawn, not what the plan said
        entry = {**entry, "echoes": len(study.acquisition.echo_times_s)}
    return {
        **entry,
        "family": study.family,
        "voxel_mm": [round(v, 4) for v in study.geometry.spacing],
        "echo_times_s": list(study.acquisition.echo_times_s),
        "field_strength_t": study.acquisition.field_strength_t,
        "snr": round(float(study.acquisition.snr), 3),
        "n_cmb": kinds.count("cmb"),
        "n_calcification": kinds.count("calcification"),
        "n_files": len(files),
        "shape": list(study.geometry.shape),
        "seconds_simulate": round(t_sim, 2),
        "seconds_total": round(seconds, 2),
    }


def family_ranges(args: argparse.Namespace):
    """The randomised family's ranges from the CLI (None for the default family)."""
    if args.family != "randomised":
        return None
    from training.sim.family import RandomisedRanges

    return RandomisedRanges(voxel_mm=tuple(args.voxel_range_mm), max_matrix_voxels=int(args.max_matrix_voxels))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.simulate", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--subjects", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--controls", type=int, default=0, help="how many of the subjects have no microbleeds")
    p.add_argument("--vendor", choices=(*VENDORS, "mixed"), default="siemens")
    p.add_argument("--echoes", default=None, help="number of echoes, or 'mixed' (1 or 4 per subject); default 4")
    p.add_argument("--voxel-mm", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"), help="default 1 1 1")
    p.add_argument("--oblique", type=float, default=0.0, metavar="DEG", help="slice tilt about left-right")
    p.add_argument("--field-t", type=float, default=None, help="default 3")
    p.add_argument("--snr", type=float, default=None, help="default 40")
    p.add_argument("--family", choices=("default", "randomised"), default="default",
                   help="phantom family (training.sim.family); randomised draws the acquisition per subject")
    p.add_argument("--voxel-range-mm", type=float, nargs=2, default=(0.5, 1.5), metavar=("MIN", "MAX"),
                   help="randomised family: voxel size range (default 0.5 1.5)")
    p.add_argument("--max-matrix-voxels", type=float, default=16e6,
                   help="randomised family: matrix cap (memory), default 16e6")
    p.add_argument("--enhanced", action="store_true", help="Enhanced MR (multi-frame) instead of classic")
    p.add_argument("--philips-phase-units", choices=("rad", "mrad"), default="rad")
    p.add_argument("--omit-echo-numbers", action="store_true", help="leave EchoNumbers out (like Siemens XA)")
    args = p.parse_args(argv)
    if args.family == "randomised":
        given = [f for f, v in (("--voxel-mm", args.voxel_mm), ("--echoes", args.echoes),
                                ("--field-t", args.field_t), ("--snr", args.snr)) if v is not None]
        if given:
            p.error(f"{', '.join(given)}: drawn per subject in the randomised family (see --voxel-range-mm)")
        if not 0 < args.voxel_range_mm[0] <= args.voxel_range_mm[1]:
            p.error("--voxel-range-mm must be 0 < MIN <= MAX")
    args.echoes = "4" if args.echoes is None else args.echoes
    if args.family == "default":
        args.voxel_mm = (1.0, 1.0, 1.0) if args.voxel_mm is None else args.voxel_mm
        args.field_t = 3.0 if args.field_t is None else args.field_t
        args.snr = 40.0 if args.snr is None else args.snr
    else:
        args.echoes = None  # drawn per subject
    if args.echoes is not None and args.echoes != "mixed" and (not args.echoes.isdigit() or int(args.echoes) < 1):
        p.error("--echoes must be a positive integer or 'mixed'")
    try:
        plan = plan_cohort(args.subjects, args.seed, args.controls, args.vendor, args.echoes)
    except ValueError as exc:
        p.error(str(exc))

    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    for entry in plan:
        rec = simulate_one(entry, args.out, args)
        records.append(rec)
        print(f"{rec['subject_id']}: {rec['vendor']}, {rec['echoes']} echo(es), {rec['n_cmb']} CMB, "
              f"{rec['n_calcification']} calcification(s), {rec['seconds_total']:.1f} s", flush=True)
    cohort = {
        "simulated": True,
        "seed": args.seed,
        "family": args.family,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "subjects": records,
    }
    (args.out / "cohort.json").write_text(json.dumps(cohort, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
