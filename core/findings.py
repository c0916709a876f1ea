"""The findings of one study: what detection produces, localisation completes and reports consume.

One :class:`Finding` per detected focus, microbleed or mimic. ``findings.json`` in the app's output
is :meth:`StudyFindings.to_json`; the SR, SEG and key images are built from the same object, so the
numbers a radiologist reads in PACS and the numbers a researcher reads in the JSON are the same.

Conventions: centres in DICOM LPS mm and in fractional voxel indices ``[i, j, k]`` of the source GRE
geometry; ``mask_label`` is the value of this finding's voxels in ``StudyFindings.label_map`` (0 =
background), which the SEG writer turns into segments.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

KINDS = ("cmb", "calcification", "iron")
"""``cmb``: cerebral microbleed; mimics kept and labelled as such, never as microbleeds:
``calcification`` (diamagnetic focus), ``iron`` (non-haemorrhagic iron deposit)."""

DEFINITE_PROBABILITY = 0.8
"""Stage II probability at or above which a microbleed is reported as *definite* (else *possible*)."""


@dataclass
class Finding:
    """One detected focus.

    Attributes:
        index: 1-based number shown to the radiologist (key images, SR), stable within a study.
        kind: one of :data:`KINDS`.
        centre_lps_mm: centre in patient coordinates (LPS mm, source frame of reference).
        centre_voxel: centre as fractional ``[i, j, k]`` indices of the source grid.
        diameter_mm: equivalent-sphere diameter of the segmented focus.
        volume_mm3: volume of the segmented focus.
        mean_chi_ppm: mean susceptibility inside the focus (QSM, ppm).
        probability: detection probability (stage II output) for ``kind``.
        mask_label: value of this focus in the study's label map (0 if not segmented).
        mars_region: MARS region key (:mod:`core.mars`) or ``None`` before localisation.
        mars_category: ``lobar`` / ``deep`` / ``infratentorial`` or ``None``.
        side: ``left`` / ``right`` / ``midline`` or ``None``.
    """

    index: int
    kind: str
    centre_lps_mm: tuple[float, float, float]
    centre_voxel: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    mean_chi_ppm: float
    probability: float
    mask_label: int = 0
    mars_region: str | None = None
    mars_category: str | None = None
    side: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown finding kind {self.kind!r}; expected one of {KINDS}")
        if not 0.0 <= float(self.probability) <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")

    @property
    def certainty(self) -> str:
        """``definite`` or ``possible`` (MARS wording), from :data:`DEFINITE_PROBABILITY`."""
        return "definite" if self.probability >= DEFINITE_PROBABILITY else "possible"

    @property
    def size_class(self) -> str:
        """``2-5mm`` or ``5-10mm`` (literature's split; below 2 mm counts as 2-5mm)."""
        return "5-10mm" if self.diameter_mm >= 5.0 else "2-5mm"

    def to_json(self) -> dict:
        d = asdict(self)
        d["centre_lps_mm"] = [round(float(v), 3) for v in self.centre_lps_mm]
        d["centre_voxel"] = [round(float(v), 3) for v in self.centre_voxel]
        for k in ("diameter_mm", "volume_mm3", "mean_chi_ppm", "probability"):
            d[k] = round(float(d[k]), 4)
        d["certainty"] = self.certainty
        d["size_class"] = self.size_class
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Finding":
        keys = cls.__dataclass_fields__.keys()
        kw = {k: d[k] for k in keys if k in d}
        kw["centre_lps_mm"] = tuple(kw["centre_lps_mm"])
        kw["centre_voxel"] = tuple(kw["centre_voxel"])
        return cls(**kw)


@dataclass
class StudyFindings:
    """All findings of one study plus the label map they index (on the source GRE grid)."""

    study_instance_uid: str
    algorithm_version: str
    findings: list[Finding] = field(default_factory=list)
    label_map: np.ndarray | None = field(default=None, repr=False)

    @property
    def microbleeds(self) -> list[Finding]:
        return [f for f in self.findings if f.kind == "cmb"]

    @property
    def mimics(self) -> list[Finding]:
        return [f for f in self.findings if f.kind != "cmb"]

    def to_json(self) -> dict:
        return {
            "study_instance_uid": self.study_instance_uid,
            "algorithm_version": self.algorithm_version,
            "n_microbleeds": len(self.microbleeds),
            "microbleeds": [f.to_json() for f in self.microbleeds],
            "mimics": [f.to_json() for f in self.mimics],
        }

    def save(self, path: Path) -> Path:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "StudyFindings":
        d = json.loads(Path(path).read_text())
        items = [Finding.from_json(x) for x in d.get("microbleeds", []) + d.get("mimics", [])]
        return cls(d["study_instance_uid"], d["algorithm_version"], sorted(items, key=lambda f: f.index))

    def check_label_map(self, shape: tuple[int, int, int]) -> None:
        """Raise ValueError unless the label map matches ``shape`` and every mask_label is in it."""
        if self.label_map is None:
            return
        if tuple(self.label_map.shape) != tuple(shape):
            raise ValueError(f"label map {self.label_map.shape} does not match the grid {shape}")
        present = set(np.unique(self.label_map).tolist())
        missing = [f.index for f in self.findings if f.mask_label and f.mask_label not in present]
        if missing:
            raise ValueError(f"findings {missing} have no voxels in the label map")
