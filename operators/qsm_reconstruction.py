"""QSM reconstruction: brain mask -> Laplacian unwrap -> echo fit -> V-SHARP -> STAR-QSM (or TKD).

Thin adapter around :func:`core.qsm.pipeline.reconstruct`. The chain runs as one operator because
the steps share a crop to the brain's bounding box (made once, after masking) that keeps every FFT
small; each step is a separate, separately tested function in ``core/qsm`` and its seconds are
recorded in ``QSMResult.timings_s`` (and the app's summary.json).

A precomputed-QSM input (``gre.precomputed_qsm``, see :mod:`core.input_kind`) is passed on as it is:
no reconstruction.
"""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.qsm.pipeline import BG_METHODS, reconstruct


class QSMReconstructionOperator(Operator):
    """``gre`` (GREVolume) -> ``qsm`` (QSMResult); ``gre`` is passed through for later steps."""

    def __init__(self, fragment: Fragment, *args, method: str = "star", device: str = "cpu",
                 bg_method: str = "vsharp", **kwargs) -> None:
        if method not in ("star", "tkd"):
            raise ValueError(f"QSM method must be 'star' or 'tkd', got {method!r}")
        if bg_method not in BG_METHODS:
            raise ValueError(f"background removal must be one of {', '.join(BG_METHODS)}, got {bg_method!r}")
        self.method = method
        self.bg_method = bg_method
        self.device = device
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.output("gre")
        spec.output("qsm")

    @progress.step("QSM reconstruction")
    def compute(self, op_input, op_output, context) -> None:
        gre = op_input.receive("gre")
        if gre.precomputed_qsm is not None:
            op_output.emit(gre, "gre")
            op_output.emit(gre.precomputed_qsm, "qsm")
            return
        qsm = reconstruct(gre.magnitude, gre.phase_rad, gre.echo_times_s, gre.field_strength_t,
                          gre.geometry, method=self.method, device=self.device,
                          bg_method=self.bg_method)
        op_output.emit(gre, "gre")
        op_output.emit(qsm, "qsm")
