"""The DICOM node: receive studies from PACS, run the app, send the results back.

``python -m deploy.node --config node.yaml`` serves; ``... status`` lists studies, jobs and
deliveries. Modules: ``config`` (YAML, validated), ``spool`` (durable files, UID checks),
``queue`` (SQLite: instances, studies, jobs, deliveries; the late-arrival policy is documented
there), ``scp`` (Storage SCP), ``scheduler`` (quiet period, early start, trigger rules), ``completeness`` (is a
GRE series complete, from what each instance says), ``worker`` (runs the app), ``sender`` (C-STORE SCU with back-off), ``service`` (wiring and crash recovery), ``logs``
(JSON lines).
"""

from .config import NodeConfig, load_config
from .service import Node

__all__ = ["Node", "NodeConfig", "load_config"]
