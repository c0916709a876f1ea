"""A precomputed QSM series in DICOM (e.g. this product's own ``dicom/qsm`` output, or a scanner's
QSM series whose ImageType value 3 is ``QSM``) with the GRE magnitude of the same acquisition ->
a :class:`GREVolume` whose ``precomputed_qsm`` carries the map, so detection, MARS and the reports
run without reconstruction.

* The QSM series: :func:`core.dicom.derived.qsm_from_frames` (rescale applied, in ppm: our series'
  ppb Modality LUT, RescaleType ``PPB``, divided by 1000;
  a map outside the ppm range is refused, :func:`core.nifti_input.check_chi_ppm`). Several QSM
  series are refused (say which by sending one).
* The magnitude: the magnitude stack (any number of echoes) on the QSM grid (same frame of
  reference, orientation, image size and slice positions); it gives the geometry, the study,
  the patient and the source images the SEG/SR reference, exactly as for a GRE input.
* The brain mask: :func:`core.qsm.mask.brain_mask` of the magnitude, as the QSM chain makes it.
"""

from __future__ import annotations

import numpy as np

from core.dicom.derived import qsm_from_frames
from core.dicom.reader import _build_stacks, _organise, _patient_and_sources, _stack_values
from core.dicom.volume import GREVolume
from core.errors import DicomInputError
from core.geometry import Geometry

_POS_TOL_MM = 0.05


def load_qsm_dicom(frames: list) -> GREVolume:
    """GREVolume (magnitude only, ``precomputed_qsm`` set) from the frames of a DICOM input.

    Raises:
        DicomInputError: no or several QSM series, no magnitude on the QSM grid, a map not in ppm.
    """
    from core.errors import NiftiInputError
    from core.nifti_input import check_chi_ppm
    from core.qsm.mask import brain_mask
    from core.qsm.pipeline import QSMResult

    qsm_frames = [f for f in frames if len(f.image_type) > 2 and f.image_type[2] == "QSM"]
    series = sorted({f.series_instance_uid for f in qsm_frames})
    if len(series) != 1:
        raise DicomInputError(f"expected one QSM series, found {len(series)}: send one precomputed QSM series")
    qsm_frames = [f for f in qsm_frames if f.series_instance_uid == series[0]]
    chi, qgeom = qsm_from_frames(qsm_frames)
    q0 = qsm_frames[0]
    stacks = [s for s in _build_stacks([f for f in frames if f.component == "M"])]
    if not stacks:
        raise DicomInputError(
            "precomputed QSM series found but no GRE magnitude series: send the magnitude too "
            "(it places the MARS atlas and fills the key images)"
        )
    usable, why = [], []
    for s in stacks:
        _organise(s)
        f = s.first
        if s.error:
            why.append(s.error)
        elif f.frame_of_reference_uid != q0.frame_of_reference_uid:
            why.append(f"{s.name} has another frame of reference than the QSM series")
        elif (f.rows, f.columns) != (q0.rows, q0.columns) or not np.allclose(f.orientation, q0.orientation, atol=1e-4):
            why.append(f"{s.name} differs from the QSM series in image size or orientation")
        elif s.n_slices != qgeom.shape[2]:
            why.append(f"{s.name} has {s.n_slices} slices, the QSM series {qgeom.shape[2]}")
        elif np.max(np.abs(s.positions() - np.stack([qgeom.slice_position(k) for k in range(qgeom.shape[2])]))) > _POS_TOL_MM:
            why.append(f"slice positions of {s.name} differ from the QSM series")
        else:
            usable.append(s)
    if not usable:
        raise DicomInputError(f"no magnitude series on the QSM grid: {why[0]}")
    mag_stack = max(usable, key=lambda s: len(s.echoes))
    magnitude = _stack_values(mag_stack).astype(np.float32)
    fa = mag_stack.first
    first_echo = mag_stack.echoes[0].frames
    geometry = Geometry(qgeom.shape, qgeom.affine, fa.frame_of_reference_uid).snapped()
    b0 = next((f.field_strength_t for f in mag_stack.frames if f.field_strength_t), None)
    if b0 is None:
        raise DicomInputError(f"MagneticFieldStrength and ImagingFrequency are both missing in {mag_stack.name}")
    try:
        chi = check_chi_ppm(chi, f"series {q0.series_number or q0.series_instance_uid}")
    except NiftiInputError as exc:
        raise DicomInputError(str(exc)) from None
    mask = brain_mask(magnitude, geometry.spacing)
    patient, sources = _patient_and_sources(fa, first_echo)
    notes = [f"precomputed QSM series {q0.series_number} '{q0.series_description}' used; no reconstruction",
             "brain mask from the first-echo magnitude (as the QSM chain makes it)"]
    gre = GREVolume(
        geometry=geometry,
        magnitude=magnitude,
        phase_rad=np.zeros((0,) + tuple(geometry.shape), np.float32),
        echo_times_s=np.array([e.te_ms * 1e-3 for e in mag_stack.echoes], dtype=np.float64),
        field_strength_t=float(b0),
        manufacturer=fa.manufacturer,
        phase_scaling="none (precomputed QSM)",
        study_instance_uid=fa.study_instance_uid,
        magnitude_series_uid=fa.series_instance_uid,
        phase_series_uid="",
        patient=patient,
        source_datasets=sources,
        notes=notes,
        input_kind="qsm-dicom",
    )
    gre.precomputed_qsm = QSMResult(chi.astype(np.float32), mask, mask, None, None, {"total": 0.0},
                                    method="precomputed", background="",
                                    reference=f"as provided (series {q0.series_instance_uid})")
    return gre
