"""Load the input folder: every DICOM instance (any layout) as pydicom datasets, or, for a research
input of NIfTI + JSON sidecars (:mod:`core.input_kind` tells which), the volume read from it.

We do not use the SDK's ``DICOMDataLoaderOperator`` here: it drops instances that share an
ImagePositionPatient within a series, keeping one per position. A multi-echo GRE series has one
instance per echo at every position (and Philips puts magnitude and phase in one series), so the
SDK loader silently throws away all echoes but one. Our loader keeps every instance and leaves
grouping to :mod:`core.dicom.reader`.

A NIfTI input (dcm2niix magnitude/phase echoes, or a precomputed QSM map with its magnitude) is read
here by :mod:`core.nifti_input` into the same :class:`~core.dicom.volume.GREVolume` the selector
builds from DICOM; the selector passes it on.
"""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.dicom.reader import load_datasets
from core.input_kind import NIFTI_GRE, QSM_NIFTI, detect_input_kind


class GREStudyLoaderOperator(Operator):
    """Folder -> ``list[pydicom.Dataset]`` (DICOM input) or a ``GREVolume`` (NIfTI input) on output
    port ``datasets``."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("datasets")

    @progress.step("read input")
    def compute(self, op_input, op_output, context) -> None:
        kind = detect_input_kind(self.input_folder)
        if kind == NIFTI_GRE:
            from core.nifti_input import load_nifti_gre

            op_output.emit(load_nifti_gre(self.input_folder), "datasets")
        elif kind == QSM_NIFTI:
            from core.nifti_input import load_nifti_qsm

            op_output.emit(load_nifti_qsm(self.input_folder), "datasets")
        else:
            op_output.emit(load_datasets(self.input_folder), "datasets")
