"""The part every result-writing operator shares: where it writes (the app's staged output folder,
see core.outputs) and the algorithm version it stamps into what it writes."""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator


class OutputWriterOperator(Operator):
    """Base of the writer operators (qsm_writer, report_writer); subclasses add setup/compute."""

    def __init__(self, fragment: Fragment, *args, output_folder: Path, algorithm_version: str, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.algorithm_version = algorithm_version
        super().__init__(fragment, *args, **kwargs)
