"""The product's in-memory form of one GRE acquisition, as the loader builds it.

``GREVolume`` is what :mod:`core.dicom.reader` returns and what every downstream step (mask,
unwrap, QSM, detection, reports) consumes. Magnitude and phase share one :class:`Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from core.geometry import Geometry


@dataclass
class GREVolume:
    """Multi-echo (or single-echo) gradient-echo magnitude and phase on one grid.

    Attributes:
        geometry: shared geometry of every echo (LPS affine, spacing, B0 direction).
        magnitude: float32 ``[echo, i, j, k]``, arbitrary units (vendor rescale applied).
        phase_rad: float32 ``[echo, i, j, k]``, wrapped radians in [-pi, pi), product polarity
            (DESIGN.md section 4): positive susceptibility -> positive phase.
        echo_times_s: echo times in seconds, ascending, one per echo.
        field_strength_t: MagneticFieldStrength in tesla.
        manufacturer: Manufacturer as written by the scanner.
        phase_scaling: human-readable description of the vendor conversion that was applied
            (e.g. "siemens: stored*2-4096 -> *pi/4096").
        phase_flipped: whether the configured per-site polarity flip was applied.
        study_instance_uid, magnitude_series_uid, phase_series_uid: provenance.
        patient: PatientID, PatientName, PatientBirthDate, PatientSex, StudyID, StudyDate, ...
            (strings, copied from the source for the result objects).
        source_datasets: first-echo magnitude datasets (headers, sorted by slice position) or the
            single Enhanced MR dataset: what SEG / SR reference as their source images.
        slice_references: one ``(SOPClassUID, SOPInstanceUID, frame number or None)`` per slice
            ``k`` of the first echo, in ``k`` order: the image an SR SCOORD on slice ``k`` points
            at (frame number 1-based, for a multi-frame source; ``None`` for classic images).
        notes: non-fatal observations made while loading (e.g. "EchoNumbers missing: ordered by
            EchoTime").
        input_kind: what the input folder held (:mod:`core.input_kind`): ``"dicom-gre"``,
            ``"nifti-gre"``, ``"qsm-nifti"`` or ``"qsm-dicom"``.
        precomputed_qsm: for a precomputed-QSM input, the :class:`core.qsm.pipeline.QSMResult` built
            from it (the reconstruction step passes it on instead of reconstructing); else ``None``.
        sources_synthesised: ``source_datasets`` were made here from NIfTI (no scanner DICOM exists);
            the QSM writer then writes them to ``dicom/source`` so the SEG/SR references resolve.
    """

    geometry: Geometry
    magnitude: np.ndarray
    phase_rad: np.ndarray
    echo_times_s: np.ndarray
    field_strength_t: float
    manufacturer: str
    phase_scaling: str
    phase_flipped: bool = False
    study_instance_uid: str = ""
    magnitude_series_uid: str = ""
    phase_series_uid: str = ""
    patient: dict = field(default_factory=dict)
    source_datasets: list = field(default_factory=list, repr=False)
    slice_references: list = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)
    input_kind: str = "dicom-gre"
    precomputed_qsm: object | None = field(default=None, repr=False)
    sources_synthesised: bool = False

    @property
    def n_echoes(self) -> int:
        return int(self.magnitude.shape[0])

    def summary(self) -> dict:
        """JSON-friendly description (the app's summary.json)."""
        return {
            "input_kind": self.input_kind,
            "manufacturer": self.manufacturer,
            "field_strength_t": self.field_strength_t,
            "n_echoes": self.n_echoes,
            "echo_times_ms": [round(float(t) * 1e3, 4) for t in self.echo_times_s],
            "phase_scaling": self.phase_scaling,
            "phase_flipped": self.phase_flipped,
            "study_instance_uid": self.study_instance_uid,
            "magnitude_series_uid": self.magnitude_series_uid,
            "phase_series_uid": self.phase_series_uid,
            "geometry": self.geometry.describe(),
            "notes": list(self.notes),
        }
