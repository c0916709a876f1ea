"""Benchmark: seconds to write all DICOM results of one study (SEG, SR, key images, summary).

    python bench/report_speed.py [--voxel-mm 1 1 1] [--n-cmb 10] [--repeat 3] [--enhanced]

Simulates one subject (not timed), writes it as DICOM, loads it, builds findings at the truth
lesions (:func:`core.report.demo.findings_from_truth`), then times :func:`core.report.write_reports`
and each writer separately (median of ``--repeat`` runs). Prints JSON and writes
bench/results/report_speed.json. Measured on simulated data, on this machine's CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import median_seconds  # noqa: E402
from core.dicom.reader import load_gre  # noqa: E402
from core.report import write_reports  # noqa: E402
from core.report.demo import findings_from_truth  # noqa: E402
from core.report.keyimages import write_key_images  # noqa: E402
from core.report.seg import write_seg  # noqa: E402
from core.report.sr import write_sr  # noqa: E402
from core.report.summary import clinical_summary  # noqa: E402
from training.sim.dicom_writer import write_study  # noqa: E402
from training.sim.phantom import simulate_subject  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--voxel-mm", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    p.add_argument("--n-cmb", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--enhanced", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "report_speed.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        study = simulate_subject("bench-report", 7, voxel_mm=tuple(args.voxel_mm), n_cmb=args.n_cmb, n_calc=2)
        write_study(study, tmp / "in", "siemens", enhanced=args.enhanced)
        gre = load_gre(tmp / "in")
        findings = findings_from_truth(study, gre.study_instance_uid)
        v = "bench"
        seg_path = write_seg(findings, gre, tmp / "w", v)
        row = {
            "shape": list(gre.geometry.shape),
            "voxel_mm": list(args.voxel_mm),
            "source": "enhanced" if args.enhanced else "classic",
            "n_source_images": len(gre.source_datasets),
            "n_microbleeds": len(findings.microbleeds),
            "n_mimics": len(findings.mimics),
            "repeat": args.repeat,
            "seg_s": median_seconds(lambda: write_seg(findings, gre, tmp / "seg", v), args.repeat),
            "sr_s": median_seconds(lambda: write_sr(findings, gre, tmp / "sr", v, seg_path=seg_path), args.repeat),
            "key_images_s": median_seconds(lambda: write_key_images(findings, gre, study.chi_ppm, tmp / "sc", v),
                                      args.repeat),
            "summary_s": median_seconds(lambda: clinical_summary(findings), args.repeat),
            "all_s": median_seconds(lambda: write_reports(findings, gre, study.chi_ppm, tmp / "all", v), args.repeat),
            "seg_bytes": seg_path.stat().st_size if seg_path else 0,
            "machine": platform.processor() or platform.machine(),
        }
    print(json.dumps(row, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
