"""The application's operator chain, in the order the data flows.

    load -> select + volume -> QSM (mask, unwrap, echo fit, V-SHARP, STAR-QSM) -> QSM writer
         -> detection (stage I: FRST + ConvScreen; stage II: V-Net and ResNet) -> MARS localisation
         -> reports (findings.json, TID 1500 SR, SEG, key images, clinical summary) -> summary.json
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from app import __version__
from operators.cmb_detector import CMBDetectorOperator, resolve_model_dir
from operators.gre_loader import GREStudyLoaderOperator
from operators.gre_selector import GRESeriesSelectorOperator
from operators.mars_localizer import MarsLocalizerOperator, MarsRegistrationOperator
from operators.qsm_reconstruction import QSMReconstructionOperator
from operators.qsm_writer import QSMWriterOperator
from operators.report_writer import CMBReportWriterOperator
from operators.study_summary import StudySummaryWriterOperator

ALGORITHM_VERSION = f"cmb-qsm {__version__}"
"""Version of the code; the QSM series carry it (the QSM does not depend on the models)."""


def detection_version(model_dir: Path | str | None = None) -> str:
    """:data:`ALGORITHM_VERSION` plus the first 8 hex digits of the sha256 of the model folder's
    ``detector.json`` (which holds every weight file's sha256, the thresholds and the operating
    point). The findings, SR, SEG and key images carry it, and their UIDs derive from it: a study
    re-run after a model update gets new series and instances instead of new content under the
    UIDs PACS already holds. Without a readable detector.json the code version alone is returned
    (the detector operator then stops with its own error)."""
    path = resolve_model_dir(model_dir) / "detector.json"
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    except OSError:
        return ALGORITHM_VERSION
    return f"{ALGORITHM_VERSION} model {digest}"


@dataclass
class AppConfig:
    """Resolved run settings (CLI flags, else HOLOSCAN_* environment, else defaults)."""

    input_dir: Path
    output_dir: Path
    model_dir: Path | None = None
    phase_flip: bool = False
    qsm_method: str = "star"
    input_copies: bool = True  # magnitude.nii.gz / phase.nii.gz for researchers
    device: str = "cpu"  # torch device of the QSM FFTs and the networks (core.device.select_device)
    bg_method: str = "vsharp"  # background field removal (core.qsm.pipeline.BG_METHODS)


class CMBApp(Application):
    """Cerebral microbleed detection on QSM, as a MONAI Deploy application."""

    name = "cmb-qsm"
    description = "QSM reconstruction and cerebral microbleed detection from multi-echo GRE DICOM"

    def __init__(self, config: AppConfig, *args, **kwargs) -> None:
        self.config = config
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        cfg, out, version = self.config, self.config.output_dir, ALGORITHM_VERSION
        det_version = detection_version(cfg.model_dir)  # findings and reports name the models
        load = GREStudyLoaderOperator(self, CountCondition(self, 1), input_folder=cfg.input_dir, name="load")
        select = GRESeriesSelectorOperator(self, phase_flip=cfg.phase_flip, name="select")
        qsm = QSMReconstructionOperator(self, method=cfg.qsm_method, device=cfg.device,
                                        bg_method=cfg.bg_method, name="qsm")
        qsm_out = QSMWriterOperator(self, output_folder=out, algorithm_version=version, name="qsm_writer")
        detect = CMBDetectorOperator(self, algorithm_version=det_version, model_dir=cfg.model_dir,
                                     device=cfg.device, name="detect")
        register = MarsRegistrationOperator(self, name="mars_registration")
        mars = MarsLocalizerOperator(self, name="mars")
        reports = CMBReportWriterOperator(self, output_folder=out, algorithm_version=det_version, name="reports")
        summary = StudySummaryWriterOperator(self, output_folder=out, input_copies=cfg.input_copies, name="summary")

        self.add_flow(load, select, {("datasets", "datasets")})
        self.add_flow(select, qsm, {("gre", "gre")})
        # the atlas registration starts (background thread) before the QSM series is written
        self.add_flow(qsm, register, {("gre", "gre"), ("qsm", "qsm")})
        self.add_flow(register, qsm_out, {("gre", "gre"), ("qsm", "qsm")})
        self.add_flow(register, mars, {("registration", "registration")})
        self.add_flow(qsm_out, detect, {("gre", "gre"), ("qsm", "qsm")})
        self.add_flow(detect, mars, {("findings", "findings")})
        self.add_flow(detect, reports, {("gre", "gre"), ("qsm", "qsm")})
        self.add_flow(mars, reports, {("findings", "findings")})
        self.add_flow(detect, summary, {("gre", "gre"), ("qsm", "qsm")})
        self.add_flow(reports, summary, {("findings", "findings")})
        self.add_flow(mars, summary, {("mars", "mars")})
