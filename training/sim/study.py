"""Data types passed between the simulator's phantom, acquisition and DICOM writer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.geometry import Geometry


@dataclass
class Lesion:
    """One inserted focal lesion or mimic, for truth.json.

    ``kind`` is one of ``"cmb"``, ``"calcification"``. ``mars_region`` is the MARS region key
    (see :mod:`core.mars`), ``side`` is ``"left"``, ``"right"`` or ``"midline"``. ``shape`` is set
    for the non-spherical lesions of the randomised family (:mod:`training.sim.family`): then
    ``diameter_mm`` is the equivalent-sphere diameter and ``centre_*`` the shape's centroid.
    """

    kind: str
    centre_lps_mm: tuple[float, float, float]
    centre_voxel: tuple[float, float, float]
    diameter_mm: float
    chi_ppm: float
    r2star_s: float
    mars_region: str
    mars_category: str
    side: str
    shape: dict | None = None  # randomised family: LesionShape.to_json(); None = sphere of diameter_mm

    def to_json(self) -> dict:
        out = {
            "kind": self.kind,
            "centre_lps_mm": [round(float(v), 3) for v in self.centre_lps_mm],
            "centre_voxel": [round(float(v), 3) for v in self.centre_voxel],
            "diameter_mm": round(float(self.diameter_mm), 3),
            "chi_ppm": round(float(self.chi_ppm), 4),
            "r2star_s": round(float(self.r2star_s), 2),
            "mars_region": self.mars_region,
            "mars_category": self.mars_category,
            "side": self.side,
        }
        if self.shape is not None:
            out["shape"] = self.shape
        return out


@dataclass
class Acquisition:
    """Scanner-side parameters of one simulated acquisition."""

    echo_times_s: list[float]
    field_strength_t: float = 3.0
    repetition_time_s: float = 0.035
    flip_angle_deg: float = 15.0
    snr: float = 40.0


@dataclass
class SimulatedStudy:
    """Everything one simulated subject produces, before it is written to disk.

    ``magnitude`` and ``phase_rad`` are ``[echo, i, j, k]`` float32 on ``geometry``; the phase is
    wrapped to [-pi, pi) with the product polarity (core.physics). Truth arrays share the grid.
    ``family`` is the phantom family (:data:`training.sim.family.FAMILIES`).
    """

    subject_id: str
    seed: int
    geometry: Geometry
    acquisition: Acquisition
    magnitude: np.ndarray
    phase_rad: np.ndarray
    chi_ppm: np.ndarray
    brain_mask: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)
    is_control: bool = False
    extra_truth: dict = field(default_factory=dict)
    family: str = "default"
    family_params: dict | None = None  # the randomised family's per-subject draws (SubjectParams.to_json())
