"""Select the GRE acquisition (magnitude + phase echoes) and build one volume on one geometry.

Thin adapter around :func:`core.dicom.reader.select_gre`: frames from every dataset (classic or
Enhanced MR), grouped by acquisition, echoes ordered by EchoTime, vendor phase scaling to radians,
optional per-site polarity flip. Emits a :class:`core.dicom.volume.GREVolume`.

DICOM holding a precomputed QSM series and the magnitude but no phase
(:func:`core.input_kind.dicom_input_kind`) goes to :func:`core.dicom.precomputed.load_qsm_dicom`
instead. A volume the loader already read from NIfTI is passed on (with the polarity flip applied).
"""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.dicom.phase_scaling import wrap
from core.dicom.reader import frames_from_dataset, select_gre
from core.dicom.volume import GREVolume
from core.input_kind import QSM_DICOM, dicom_input_kind


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
        if isinstance(datasets, GREVolume):  # read from NIfTI by the loader
            if self.phase_flip and datasets.phase_rad.size:
                datasets.phase_rad = wrap(-datasets.phase_rad.astype("float64"))
                datasets.phase_flipped = True
            op_output.emit(datasets, "gre")
            return
        frames = [f for ds in datasets for f in frames_from_dataset(ds)]
        if dicom_input_kind(frames) == QSM_DICOM:
            from core.dicom.precomputed import load_qsm_dicom

            op_output.emit(load_qsm_dicom(frames), "gre")
            return
        op_output.emit(select_gre(frames, phase_flip=self.phase_flip), "gre")
