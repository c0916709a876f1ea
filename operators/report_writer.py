"""Write one study's detection results: findings.json for researchers, DICOM for PACS.

Files (inside the staged output folder)::

    findings.json            core.findings.StudyFindings.save (microbleeds + mimics)
    stages.json              candidates passed on by each stage (training.evaluate's format),
                             when the findings come from core.detect.detector
    detection.json           seconds per detection stage, when known
    cmb_summary.txt / .json  the clinical summary (core.report.summary)
    dicom/cmb/SR_CMB.dcm     TID 1500 measurement report
    dicom/cmb/SEG_CMB.dcm    segmentation (only when something is segmented)
    dicom/cmb/KEY_<n>.dcm    key images, one per finding
    dicom/cmb/KO_CMB.dcm     key object selection (key images + SR), when there are findings

Thin adapter around :func:`core.report.write_reports`.
"""

from __future__ import annotations

import json
from pathlib import Path

from monai.deploy.core import OperatorSpec

from core import progress
from core.findings import StudyFindings
from core.report import write_reports
from operators._writer import OutputWriterOperator


def write_detection_outputs(gre, qsm, findings: StudyFindings, out_dir: Path,
                            algorithm_version: str) -> dict[str, list[Path]]:
    """Write the files listed in the module docstring; return the paths by kind (``findings``,
    ``stages``, ``seg``, ``sr``, ``key_images``, ``kos``, ``summary``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {"findings": [findings.save(out_dir / "findings.json")], "stages": []}
    stages = getattr(findings, "stages", None)
    if stages is not None:
        p = out_dir / "stages.json"
        p.write_text(json.dumps(stages, indent=1) + "\n")
        written["stages"].append(p)
    timings = getattr(findings, "timings_s", None)
    if timings is not None:
        p = out_dir / "detection.json"
        p.write_text(json.dumps({"seconds": timings}, indent=2) + "\n")
        written["stages"].append(p)
    reports = write_reports(findings, gre, qsm.chi_ppm, out_dir / "dicom" / "cmb", algorithm_version,
                            qsm_paths=qsm.series_paths or None)
    moved = []
    for p in reports.pop("summary"):  # the clinical summary sits beside findings.json, not with DICOM
        dest = out_dir / p.name
        p.replace(dest)
        moved.append(dest)
    written.update(reports)
    written["summary"] = moved
    return written


class CMBReportWriterOperator(OutputWriterOperator):
    """``gre`` + ``qsm`` + ``findings`` -> files in the (staged) output folder; ``findings`` passed on
    (so the study summary is written after every report file exists)."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.input("qsm")
        spec.input("findings")
        spec.output("findings")

    @progress.step("SR, SEG, key images")
    def compute(self, op_input, op_output, context) -> None:
        gre, qsm = op_input.receive("gre"), op_input.receive("qsm")
        findings = op_input.receive("findings")
        write_detection_outputs(gre, qsm, findings, self.output_folder, self.algorithm_version)
        op_output.emit(findings, "findings")
