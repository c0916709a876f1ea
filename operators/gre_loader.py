"""Load every DICOM instance under the input folder (any layout) as pydicom datasets.

We do not use the SDK's ``DICOMDataLoaderOperator`` here: it drops instances that share an
ImagePositionPatient within a series, keeping one per position. A multi-echo GRE series has one
instance per echo at every position (and Philips puts magnitude and phase in one series), so the
SDK loader silently throws away all echoes but one. Our loader keeps every instance and leaves
grouping to :mod:`core.dicom.reader`.
"""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.dicom.reader import load_datasets


class GREStudyLoaderOperator(Operator):
    """Folder -> ``list[pydicom.Dataset]`` on output port ``datasets``."""

    def __init__(self, fragment: Fragment, *args, input_folder: Path, **kwargs) -> None:
        self.input_folder = Path(input_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("datasets")

    @progress.step("read DICOM")
    def compute(self, op_input, op_output, context) -> None:
        op_output.emit(load_datasets(self.input_folder), "datasets")
