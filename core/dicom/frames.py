"""One 2-D image plane, whatever storage it came from: the unit the series selector works on.

Classic MR Image Storage gives one :class:`Frame` per instance; Enhanced MR Image Storage gives one
per frame of a multi-frame instance (per-frame and shared functional groups resolved). Everything
after this point (grouping into acquisitions, echo ordering, vendor phase scaling, stacking) works
on frames and never looks at the storage class again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np


@dataclass
class Frame:
    """Header facts of one image plane plus a lazy accessor for its stored pixel values.

    Attributes:
        sop_instance_uid: the instance the plane belongs to.
        frame_number: 1-based frame number within a multi-frame instance, ``None`` for classic.
        series_instance_uid, study_instance_uid, frame_of_reference_uid: as in the header.
        series_number, series_description: for messages and grouping.
        manufacturer: Manufacturer (0008,0070), as written.
        image_type: ImageType values, upper case (for Enhanced MR: FrameType of the frame).
        component: what the pixels hold: ``"M"`` magnitude, ``"P"`` phase, ``"R"`` real,
            ``"I"`` imaginary, or ``None`` if nothing in the header says.
        echo_time_ms: EchoTime (classic) or EffectiveEchoTime (enhanced); ``None`` if absent.
        echo_number: EchoNumbers if present, else ``None`` (some scanners omit or repeat it).
        position: ImagePositionPatient (LPS mm) of the first transmitted pixel.
        orientation: ImageOrientationPatient, 6 floats.
        pixel_spacing: PixelSpacing (row spacing, column spacing) mm.
        slice_thickness: SliceThickness mm (``None`` if absent).
        rows, columns: image size.
        rescale_slope, rescale_intercept: Modality LUT (1, 0 if absent).
        rescale_type: RescaleType if present (e.g. ``"mrad"``), else ``None``.
        field_strength_t: MagneticFieldStrength (T), ``None`` if absent.
        acquisition_key: extra grouping key (e.g. AcquisitionNumber / SeriesNumber) that keeps two
            acquisitions sharing one frame of reference apart.
        private: vendor hints read from private tags (e.g. GE image type 0043,102F).
        pixels: callable returning the stored (pre-rescale) values as a 2-D ``[row, col]`` array.
        dataset: the source pydicom Dataset (header), kept for provenance and SEG/SR references.
    """

    sop_instance_uid: str
    frame_number: int | None
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    series_number: int | None
    series_description: str
    manufacturer: str
    image_type: tuple[str, ...]
    component: str | None
    echo_time_ms: float | None
    echo_number: int | None
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    rows: int
    columns: int
    rescale_slope: float = 1.0
    rescale_intercept: float = 0.0
    rescale_type: str | None = None
    field_strength_t: float | None = None
    acquisition_key: str = ""
    private: dict = field(default_factory=dict)
    pixels: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    dataset: object = field(default=None, repr=False)

    def normal(self) -> np.ndarray:
        """Unit slice normal (row x column direction)."""
        n = np.cross(self.orientation[:3], self.orientation[3:6])
        return n / np.linalg.norm(n)

    def slice_location(self) -> float:
        """Position along the slice normal (mm): the sort key within a stack."""
        return float(np.dot(self.position, self.normal()))
