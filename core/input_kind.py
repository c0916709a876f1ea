"""What kind of input a folder holds, so ``python -m app -i DIR`` needs no flag for it.

Kinds (and who reads them):

``dicom-gre``   scanner DICOM with GRE magnitude and phase (or real/imaginary): :mod:`core.dicom.reader`
``qsm-dicom``   DICOM holding a QSM series (ImageType value 3 ``QSM``, e.g. this product's own output)
                and the GRE magnitude, but no phase: :mod:`core.dicom.precomputed`
``nifti-gre``   NIfTI + JSON sidecars (dcm2niix / BIDS) with magnitude and phase echoes:
                :func:`core.nifti_input.load_nifti_gre`
``qsm-nifti``   a NIfTI QSM map (ppm) with the magnitude echoes: :func:`core.nifti_input.load_nifti_qsm`

Rules, in this order: NIfTI files present -> a NIfTI kind (``qsm-nifti`` when one of them is a QSM
map, see :func:`core.nifti_input.classify`); otherwise DICOM. The two DICOM kinds are told apart
once the frames are read (:func:`dicom_input_kind`, no second pass over the files): a usable phase
keeps the existing GRE path, so a study that PACS sends back with our QSM series still gets
reconstructed as before. A folder with neither kind is refused by name of what was found.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import CMBError

DICOM_GRE, QSM_DICOM, NIFTI_GRE, QSM_NIFTI = "dicom-gre", "qsm-dicom", "nifti-gre", "qsm-nifti"
KINDS = (DICOM_GRE, QSM_DICOM, NIFTI_GRE, QSM_NIFTI)


class InputKindError(CMBError):
    """The input folder holds nothing the app can read."""


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def detect_input_kind(folder: Path) -> str:
    """``"dicom"`` (one of the DICOM kinds, decided by :func:`dicom_input_kind`), ``NIFTI_GRE`` or
    ``QSM_NIFTI``.

    Raises:
        InputKindError: no NIfTI and no DICOM file under ``folder`` (the message counts what was there).
    """
    from core.nifti_input import scan_nifti

    folder = Path(folder)
    nifti = scan_nifti(folder)
    if nifti.all:
        return QSM_NIFTI if nifti.by_kind["QSM"] else NIFTI_GRE
    files = [folder] if folder.is_file() else [p for p in folder.rglob("*") if p.is_file()]
    if any(_is_dicom_file(p) for p in files):
        return "dicom"
    suffixes = sorted({p.suffix or "(none)" for p in files})
    raise InputKindError(
        f"no DICOM or NIfTI files in {folder}: {len(files)} file(s)"
        + (f" with suffixes {', '.join(suffixes[:6])}" if files else "")
        + "; expected scanner DICOM, dcm2niix NIfTI + JSON, or a QSM map"
    )


def dicom_input_kind(frames: list) -> str:
    """``DICOM_GRE`` when the frames hold a phase (or real + imaginary) or no QSM series;
    ``QSM_DICOM`` when they hold a QSM series (ImageType value 3 ``QSM``) and no phase."""
    comps = {f.component for f in frames}
    if "P" in comps or {"R", "I"} <= comps:
        return DICOM_GRE
    if any(len(f.image_type) > 2 and f.image_type[2] == "QSM" for f in frames):
        return QSM_DICOM
    return DICOM_GRE
