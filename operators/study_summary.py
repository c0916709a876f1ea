"""Write what the loader found: summary.json and NIfTI copies of magnitude and phase.

This is the researcher's and the PACS administrator's first check that a scanner's series were read
as intended (echoes, echo times, field strength, geometry, vendor phase scaling applied).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.dicom.volume import GREVolume
from core.nifti import save_nifti


def write_study_summary(gre: GREVolume, out_dir: Path, qsm=None, findings=None, mars: dict | None = None,
                        extra: dict | None = None, input_copies: bool = True) -> dict:
    """Write summary.json and, with ``input_copies``, magnitude.nii.gz and phase.nii.gz
    ([i, j, k, echo]); return the summary.

    With a ``qsm`` result the summary also records the method, the reference and seconds per step.
    The input copies are the largest and slowest outputs (two gzipped float32 4-D volumes, ~100 MB
    and ~4 s each for a 1 mm 4-echo study on 2 cores); a DICOM node, which keeps the input DICOM in
    its spool, runs without them (``--no-input-copies``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if input_copies:
        save_nifti(out_dir / "magnitude.nii.gz", np.moveaxis(gre.magnitude, 0, -1), gre.geometry)
        if gre.phase_rad.size:  # a precomputed-QSM input has no phase
            save_nifti(out_dir / "phase.nii.gz", np.moveaxis(gre.phase_rad, 0, -1), gre.geometry)
    summary = {"input": gre.summary()}
    if qsm is not None:
        summary["qsm"] = {
            "method": qsm.method,
            "background_removal": qsm.background or None,
            "unwrap_corrected_voxels": int(qsm.unwrap_corrected_voxels),
            "reference": qsm.reference,
            "brain_volume_ml": round(float(qsm.mask.sum()) * gre.geometry.voxel_volume_mm3 / 1000.0, 1),
            "seconds": {k: round(float(v), 3) for k, v in qsm.timings_s.items()},
        }
    if findings is not None:
        summary["detection"] = {
            "n_microbleeds": len(findings.microbleeds),
            "n_mimics": len(findings.mimics),
            "seconds": {k: round(float(v), 3) for k, v in (getattr(findings, "timings_s", None) or {}).items()},
        }
    if mars is not None:
        summary["mars"] = mars
    summary["files"] = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    summary["files"].append("summary.json")
    if extra:
        summary.update(extra)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class StudySummaryWriterOperator(Operator):
    """``gre``, ``qsm``, ``findings``, ``mars`` -> summary.json (+ magnitude/phase NIfTI); the last step."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, input_copies: bool = True,
                 **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.input_copies = input_copies
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.input("qsm")
        spec.input("findings")
        spec.input("mars")

    @progress.step("study summary")
    def compute(self, op_input, op_output, context) -> None:
        write_study_summary(op_input.receive("gre"), self.output_folder, qsm=op_input.receive("qsm"),
                            findings=op_input.receive("findings"), mars=op_input.receive("mars"),
                            input_copies=self.input_copies)
