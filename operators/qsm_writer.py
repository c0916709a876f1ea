"""Write the QSM map: NIfTI for researchers, a derived MR series for PACS.

Files (inside the staged output folder):
    qsm.nii.gz, brain_mask.nii.gz          chi in ppm on the source grid, and the mask used
    dicom/qsm/QSM_<method>_NNNN.dcm        derived MR series (core.dicom.derived), stable UIDs; their
                                           paths go on in ``qsm.series_paths`` (the SR references them)
    dicom/source/MAG_NNNN.dcm              NIfTI input only: the first-echo magnitude as DICOM, the
                                           source images the SEG/SR/key images reference

A precomputed QSM map (input kinds ``qsm-nifti`` / ``qsm-dicom``) gets the NIfTI files only: the
map is the input, a DICOM copy of it would be a second series with the same content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.deploy.core import OperatorSpec

from core import progress
from core.dicom.derived import write_qsm_series
from core.nifti import save_nifti
from operators._writer import OutputWriterOperator

METHOD_NAMES = {"star": "STAR-QSM", "tkd": "TKD"}
BACKGROUND_NAMES = {"vsharp": "V-SHARP", "pdf": "PDF", "lbv": "LBV"}


def write_qsm_outputs(gre, qsm, out_dir: Path, algorithm_version: str) -> list[Path]:
    """Write the NIfTI maps and the DICOM QSM series; return the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        save_nifti(out_dir / "qsm.nii.gz", qsm.chi_ppm, gre.geometry),
        save_nifti(out_dir / "brain_mask.nii.gz", qsm.mask.astype(np.uint8), gre.geometry, dtype=np.uint8),
    ]
    if gre.sources_synthesised:
        from core.nifti_input import write_source_series

        paths += write_source_series(gre, out_dir / "dicom" / "source")
    if qsm.method in METHOD_NAMES:
        series = write_qsm_series(qsm.chi_ppm, gre, out_dir / "dicom" / "qsm",
                                  method=METHOD_NAMES[qsm.method], algorithm_version=algorithm_version,
                                  background=BACKGROUND_NAMES.get(qsm.background, "V-SHARP"))
        qsm.series_paths = list(series)  # the SR draws each finding's circle on its QSM slice
        paths += series
    return paths


class QSMWriterOperator(OutputWriterOperator):
    """``gre`` + ``qsm`` -> files; passes both on for the summary."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.input("qsm")
        spec.output("gre")
        spec.output("qsm")

    @progress.step("QSM series + NIfTI")
    def compute(self, op_input, op_output, context) -> None:
        gre, qsm = op_input.receive("gre"), op_input.receive("qsm")
        write_qsm_outputs(gre, qsm, self.output_folder, self.algorithm_version)
        op_output.emit(gre, "gre")
        op_output.emit(qsm, "qsm")
