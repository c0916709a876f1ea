"""Findings built from simulator truth: fixtures for the report tests, the benchmark and demos.

:func:`findings_from_truth` turns the lesions a :class:`training.sim.study.SimulatedStudy` inserted
into a :class:`core.findings.StudyFindings` as a perfect detector would report them (label map
spheres at the truth centres, truth MARS region / side), with chosen probabilities so that both
*definite* and *possible* findings occur. It is not a detector.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.findings import Finding, StudyFindings
from core.geometry import Geometry


def sphere_label_map(geometry: Geometry, centres_voxel: Sequence[Sequence[float]],
                     diameters_mm: Sequence[float]) -> np.ndarray:
    """uint16 ``[i, j, k]`` map: sphere n (1-based) where the voxel centre lies within its radius.

    The voxel nearest each centre is always included, so a focus smaller than a voxel still has
    one voxel.
    """
    lm = np.zeros(geometry.shape, dtype=np.uint16)
    spacing = np.sqrt((geometry.affine[:3, :3] ** 2).sum(axis=0))
    grids = np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij")
    for n, (c, d) in enumerate(zip(centres_voxel, diameters_mm), start=1):
        dist2 = sum(((g - float(ci)) * s) ** 2 for g, ci, s in zip(grids, c, spacing))
        lm[dist2 <= (float(d) / 2) ** 2] = n
        near = tuple(int(np.clip(round(float(ci)), 0, m - 1)) for ci, m in zip(c, geometry.shape))
        lm[near] = n
    return lm


def findings_from_truth(study, study_instance_uid: str, algorithm_version: str = "0.1.0",
                        probabilities: Sequence[float] | None = None) -> StudyFindings:
    """StudyFindings at the simulator's truth lesions (see module docstring).

    Args:
        study: a ``SimulatedStudy`` (its ``lesions`` and ``geometry``).
        study_instance_uid: the StudyInstanceUID the DICOM was written with.
        algorithm_version: stored in the findings.
        probabilities: one per lesion; default alternates 0.95 / 0.65 (definite / possible).
    """
    lesions = list(study.lesions)
    if probabilities is None:
        probabilities = [0.95 if n % 2 == 0 else 0.65 for n in range(len(lesions))]
    items = []
    for n, (les, p) in enumerate(zip(lesions, probabilities), start=1):
        items.append(Finding(
            index=n, kind=les.kind, centre_lps_mm=tuple(float(v) for v in les.centre_lps_mm),
            centre_voxel=tuple(float(v) for v in les.centre_voxel), diameter_mm=float(les.diameter_mm),
            volume_mm3=float(np.pi / 6 * les.diameter_mm ** 3), mean_chi_ppm=float(les.chi_ppm),
            probability=float(p), mask_label=n, mars_region=les.mars_region,
            mars_category=les.mars_category, side=les.side))
    lm = sphere_label_map(study.geometry, [f.centre_voxel for f in items], [f.diameter_mm for f in items])
    return StudyFindings(study_instance_uid, algorithm_version, items, lm)
