"""Select the GRE acquisition (magnitude + phase echoes) and build one volume on one geometry.

Thin adapter around :func:`core.dicom.reader.select_gre`: frames from every dataset (classic or
Enhanced MR), grouped by acquisition, echoes ordered by EchoTime, vendor phase scaling to radians,
optional per-site polarity flip. Emits a :class:`core.dicom.volume.GREVolume`.
"""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.dicom.reader import frames_from_dataset, select_gre


class GRESeriesSelectorOperator(Operator):
    """``datasets`` -> ``gre`` (GREVolume)."""

    def __init__(self, fragment: Fragment, *args, phase_flip: bool = False, **kwargs) -> None:
        self.phase_flip = bool(phase_flip)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("datasets")
        spec.output("gre")

    @progress.step("select series, build volume")
    def compute(self, op_input, op_output, context) -> None:
        datasets = op_input.receive("datasets")
        frames = [f for ds in datasets for f in frames_from_dataset(ds)]
        op_output.emit(select_gre(frames, phase_flip=self.phase_flip), "gre")
