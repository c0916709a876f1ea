"""The DICOM results a radiologist sees, built from one study's :class:`core.findings.StudyFindings`.

* :mod:`core.report.seg`: binary DICOM SEG of the microbleeds (and mimics) on the source grid;
* :mod:`core.report.sr`: Comprehensive 3D SR, TID 1500 measurement report;
* :mod:`core.report.keyimages`: Secondary Capture key images (QSM + GRE crop per finding);
* :mod:`core.report.keyobjects`: Key Object Selection document (key images + SR, "Of Interest");
* :mod:`core.report.summary`: the clinical summary (counts, MARS table, Boston v2.0 pattern);
* :mod:`core.report.codes`: every coded concept used, with where it was verified.

:func:`write_reports` writes them all for one study.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from core.dicom.volume import GREVolume
from core.findings import StudyFindings


def write_reports(findings: StudyFindings, gre: GREVolume, chi_ppm: np.ndarray, out_dir: Path,
                  algorithm_version: str, qsm_paths: list[Path] | None = None) -> dict[str, list[Path]]:
    """Write SEG (when there is something segmented), SR, key images, the KOS (when there are key
    images) and the clinical summary. ``qsm_paths``: the QSM series written for this map, by slice
    (the SR's circles go on them as well as on the source magnitude).

    Files in ``out_dir``: ``SEG_CMB.dcm``, ``SR_CMB.dcm``, ``KEY_<n>.dcm``, ``KO_CMB.dcm``,
    ``cmb_summary.json`` and ``cmb_summary.txt``. Returns the written paths by kind (``seg``,
    ``sr``, ``key_images``, ``kos``, ``summary``).
    """
    from core.report.keyimages import write_key_images
    from core.report.keyobjects import write_kos
    from core.report.seg import write_seg
    from core.report.sr import write_sr
    from core.report.summary import clinical_summary

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg = write_seg(findings, gre, out_dir, algorithm_version)
    sr = write_sr(findings, gre, out_dir, algorithm_version, seg_path=seg, qsm_paths=qsm_paths)
    keys = write_key_images(findings, gre, chi_ppm, out_dir, algorithm_version)
    kos = write_kos(findings, gre, out_dir, algorithm_version, keys, sr)
    summary = clinical_summary(findings)
    js = out_dir / "cmb_summary.json"
    js.write_text(json.dumps(summary, indent=2) + "\n")
    txt = out_dir / "cmb_summary.txt"
    txt.write_text(summary["text"] + "\n")
    return {"seg": [seg] if seg else [], "sr": [sr], "key_images": keys,
            "kos": [kos] if kos else [], "summary": [js, txt]}
