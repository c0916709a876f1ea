"""The application's operator chain, in the order the data flows.

    load -> select + volume -> QSM (mask, unwrap, echo fit, V-SHARP, STAR-QSM) -> QSM writer -> summary

Later steps (candidates, V-Net, MARS, SR / SEG / key images) join this chain as they are built;
nothing downstream is pretended before it exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from app import __version__
from operators.gre_loader import GREStudyLoaderOperator
from operators.gre_selector import GRESeriesSelectorOperator
from operators.qsm_reconstruction import QSMReconstructionOperator
from operators.qsm_writer import QSMWriterOperator
from operators.study_summary import StudySummaryWriterOperator

ALGORITHM_VERSION = f"cmb-qsm {__version__}"


@dataclass
class AppConfig:
    """Resolved run settings (CLI flags, else HOLOSCAN_* environment, else defaults)."""

    input_dir: Path
    output_dir: Path
    model_dir: Path | None = None
    phase_flip: bool = False
    qsm_method: str = "star"


class CMBApp(Application):
    """Cerebral microbleed detection on QSM, as a MONAI Deploy application."""

    name = "cmb-qsm"
    description = "QSM reconstruction and cerebral microbleed detection from multi-echo GRE DICOM"

    def __init__(self, config: AppConfig, *args, **kwargs) -> None:
        self.config = config
        super().__init__(*args, **kwargs)

    def compose(self) -> None:
        cfg = self.config
        load = GREStudyLoaderOperator(self, CountCondition(self, 1), input_folder=cfg.input_dir, name="load")
        select = GRESeriesSelectorOperator(self, phase_flip=cfg.phase_flip, name="select")
        qsm = QSMReconstructionOperator(self, method=cfg.qsm_method, name="qsm")
        qsm_out = QSMWriterOperator(self, output_folder=cfg.output_dir, algorithm_version=ALGORITHM_VERSION,
                                    name="qsm_writer")
        summary = StudySummaryWriterOperator(self, output_folder=cfg.output_dir, name="summary")
        self.add_flow(load, select, {("datasets", "datasets")})
        self.add_flow(select, qsm, {("gre", "gre")})
        self.add_flow(qsm, qsm_out, {("gre", "gre"), ("qsm", "qsm")})
        self.add_flow(qsm_out, summary, {("gre", "gre"), ("qsm", "qsm")})
