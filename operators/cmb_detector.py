"""Microbleed detection operator: QSM -> findings (stage I, ConvScreen, V-Net; calcification mimics).

Thin adapter around :class:`core.detect.detector.CMBDetector`. The detector (``detector.json`` and
the network weights, sha256-checked) is loaded once, when the operator is built, so a missing or
altered model folder stops the app before any reconstruction runs. The model folder is the app's
``-m`` / ``HOLOSCAN_MODEL_PATH``, else ``models/`` of this repository (:func:`resolve_model_dir`).
"""

from __future__ import annotations

import os
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.detect.detector import CMBDetector
from core.findings import StudyFindings

REPO_MODELS = Path(__file__).resolve().parents[1] / "models"


def resolve_model_dir(model_dir: Path | str | None = None) -> Path:
    """``model_dir``, else ``$HOLOSCAN_MODEL_PATH``, else the repository's ``models/``."""
    if model_dir:
        return Path(model_dir)
    env = os.environ.get("HOLOSCAN_MODEL_PATH")
    return Path(env) if env else REPO_MODELS


def detect_study(detector: CMBDetector, gre, qsm, algorithm_version: str) -> StudyFindings:
    """Findings of one study from its GREVolume and QSMResult (brain mask = the QSM chain's mask).

    The returned object also carries ``timings_s`` and ``stages`` (see ``CMBDetector.detect``).
    """
    return detector.detect(qsm.chi_ppm, qsm.mask, gre.geometry,
                           study_instance_uid=gre.study_instance_uid, algorithm_version=algorithm_version)


class CMBDetectorOperator(Operator):
    """``gre`` (GREVolume) + ``qsm`` (QSMResult) -> ``gre``, ``qsm`` (passed on), ``findings``
    (StudyFindings with the label map on the GRE grid)."""

    def __init__(self, fragment: Fragment, *args, algorithm_version: str, model_dir: Path | None = None,
                 device: str = "cpu", **kwargs) -> None:
        self.algorithm_version = algorithm_version
        self.model_dir = resolve_model_dir(model_dir)
        self.detector = CMBDetector.load(self.model_dir, device=device)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.input("qsm")
        spec.output("gre")
        spec.output("qsm")
        spec.output("findings")

    @progress.step("detection (stage I + II)")
    def compute(self, op_input, op_output, context) -> None:
        gre, qsm = op_input.receive("gre"), op_input.receive("qsm")
        findings = detect_study(self.detector, gre, qsm, self.algorithm_version)
        op_output.emit(gre, "gre")
        op_output.emit(qsm, "qsm")
        op_output.emit(findings, "findings")
