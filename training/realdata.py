"""A hospital's own annotated cohort as reference lesions, in the simulator's ``truth.json`` form.

    python -m training.realdata --manifest cohort.csv --out DIR [--calcification-label N]

writes ``DIR/<subject_id>/truth/truth.json`` for every subject of the manifest, so
``python -m training.evaluate --truth DIR ...`` scores a detector on real data unchanged (and the
JSON it writes says ``"simulated": false``).

Manifest: a CSV file with a header row; one row per subject. Relative paths are relative to the
manifest's folder.

=================  ========  ====================================================================
column             required  meaning
=================  ========  ====================================================================
``subject_id``     yes       folder name used for predictions and truth (letters, digits, ``-_.``)
``image``          yes       the subject's QSM NIfTI (``.nii`` / ``.nii.gz``) or a folder of
                             multi-echo GRE DICOM (magnitude + phase) for the app to process
``label``          no        reference lesions: a NIfTI label mask on the image grid, or a CSV of
                             lesion centres (below); empty only for a control without lesions
``label_space``    no        ``LPS`` (default) or ``RAS``: the space of a lesion CSV's centres
``control``        no        ``1``/``true``/``yes`` for a control subject (default no)
``split``          no        free text, e.g. ``train`` / ``val`` / ``test``; copied into truth.json
=================  ========  ====================================================================

Label mask (NIfTI): every connected component (26-connectivity) of non-zero voxels is one lesion;
voxels equal to ``--calcification-label`` (if given) are calcifications, all other non-zero values
microbleeds. Centre = centroid of the component's voxel indices mapped through the NIfTI affine,
which is RAS, then to DICOM LPS: ``(L, P, S) = (-x, -y, z)``. Diameter = equivalent-sphere diameter
``(6 V / pi)^(1/3)`` with ``V`` = voxel count x voxel volume.

Lesion CSV: header with ``x, y, z`` (mm, in ``label_space``) and ``diameter_mm``; optional
``kind`` (``cmb`` default, or ``calcification``), ``mars_region``, ``mars_category``.

MARS regions are not derived here (the image is in native space; :mod:`core.mars` works on atlas
space): give them in the lesion CSV, or evaluation reports them under ``unknown``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import ConfigError

TRUTH_VERSION = 1
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"", "0", "false", "no", "n", "f"}
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class RealSubject:
    """One row of a cohort manifest, paths resolved."""

    subject_id: str
    image: Path
    label: Path | None
    label_space: str = "LPS"
    control: bool = False
    split: str | None = None

    @property
    def image_kind(self) -> str:
        """``qsm_nifti`` or ``gre_dicom_folder``."""
        return "gre_dicom_folder" if self.image.is_dir() else "qsm_nifti"


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(".nii") or p.name.endswith(".nii.gz")


def _flag(value: str, what: str, row: int) -> bool:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"manifest row {row}: {what} must be yes/no, 1/0 or true/false, got {value!r}")


def load_manifest(path: str | Path) -> list[RealSubject]:
    """Read and check a cohort manifest (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"manifest {path} does not exist")
    base = path.parent
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip() for c in (reader.fieldnames or [])}
        missing = {"subject_id", "image"} - cols
        if missing:
            raise ConfigError(f"manifest {path} lacks column(s) {', '.join(sorted(missing))}")
        subjects, seen = [], set()
        for n, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            sid = row["subject_id"]
            if not _SAFE_ID.match(sid):
                raise ConfigError(
                    f"manifest row {n}: subject_id {sid!r} must be letters, digits, '-', '_' or '.'")
            if sid in seen:
                raise ConfigError(f"manifest row {n}: subject_id {sid} appears twice")
            seen.add(sid)
            image = (base / row["image"]) if row["image"] else None
            if image is None or not image.exists():
                raise ConfigError(f"manifest row {n}: image {row['image']!r} of {sid} does not exist")
            if image.is_file() and not _is_nifti(image):
                raise ConfigError(
                    f"manifest row {n}: image of {sid} must be a QSM NIfTI or a folder of GRE DICOM")
            label = (base / row["label"]) if row.get("label") else None
            control = _flag(row.get("control", ""), "control", n)
            if label is None and not control:
                raise ConfigError(f"manifest row {n}: {sid} has no label; only a control may have none")
            if label is not None:
                if not label.is_file():
                    raise ConfigError(f"manifest row {n}: label {row['label']!r} of {sid} does not exist")
                if not (_is_nifti(label) or label.suffix.lower() == ".csv"):
                    raise ConfigError(
                        f"manifest row {n}: label of {sid} must be a NIfTI mask or a CSV of lesions")
            space = (row.get("label_space") or "LPS").upper()
            if space not in ("LPS", "RAS"):
                raise ConfigError(f"manifest row {n}: label_space must be LPS or RAS, got {space!r}")
            subjects.append(RealSubject(sid, image, label, space, control, row.get("split") or None))
    if not subjects:
        raise ConfigError(f"manifest {path} lists no subjects")
    return subjects


def ras_to_lps(xyz: np.ndarray) -> np.ndarray:
    """RAS mm (NIfTI) to LPS mm (DICOM): negate x and y."""
    out = np.asarray(xyz, dtype=float).copy()
    out[..., 0] *= -1.0
    out[..., 1] *= -1.0
    return out


def _lesion_record(kind: str, centre_lps, diameter_mm: float, **extra) -> dict:
    rec = {
        "kind": kind,
        "centre_lps_mm": [round(float(v), 3) for v in centre_lps],
        "diameter_mm": round(float(diameter_mm), 3),
        "mars_region": extra.pop("mars_region", None) or None,
        "mars_category": extra.pop("mars_category", None) or None,
        "side": None,
    }
    rec.update(extra)
    return rec


def lesions_from_mask(nifti_path: str | Path, *, calcification_label: int | None = None) -> list[dict]:
    """Reference lesions from a NIfTI label mask: one per 26-connected component (module docstring)."""
    import nibabel as nib
    from scipy import ndimage

    try:
        img = nib.load(str(nifti_path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ConfigError(f"label mask {nifti_path} cannot be read as NIfTI ({exc})") from exc
    data = np.asarray(img.dataobj)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ConfigError(f"label mask {nifti_path} must be 3-D, has shape {data.shape}")
    data = np.rint(data).astype(np.int64)
    aff = np.asarray(img.affine, dtype=float)
    voxel_mm3 = abs(float(np.linalg.det(aff[:3, :3])))
    calc = 0 if calcification_label is None else int(calcification_label)
    groups = [("cmb", (data != 0) & (data != calc))]
    if calcification_label is not None:
        groups.append(("calcification", data == calcification_label))
    out = []
    structure = np.ones((3, 3, 3), dtype=bool)
    for kind, mask in groups:
        lab, n = ndimage.label(mask, structure=structure)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        counts = ndimage.sum_labels(np.ones_like(lab), lab, idx)
        centres = np.asarray(ndimage.center_of_mass(mask, lab, idx), dtype=float).reshape(-1, 3)
        ras = centres @ aff[:3, :3].T + aff[:3, 3]
        lps = ras_to_lps(ras)
        for c_vox, c_lps, cnt in zip(centres, lps, counts):
            vol = float(cnt) * voxel_mm3
            out.append(_lesion_record(kind, c_lps, (6.0 * vol / np.pi) ** (1.0 / 3.0),
                                      centre_voxel=[round(float(v), 3) for v in c_vox],
                                      volume_mm3=round(vol, 3), n_voxels=int(cnt)))
    return out


def lesions_from_csv(path: str | Path, space: str = "LPS") -> list[dict]:
    """Reference lesions from a CSV of centres (``x, y, z`` in ``space`` mm) and ``diameter_mm``."""
    space = space.upper()
    if space not in ("LPS", "RAS"):
        raise ConfigError(f"lesion CSV space must be LPS or RAS, got {space!r}")
    path = Path(path)
    out = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip() for c in (reader.fieldnames or [])}
        if not {"x", "y", "z", "diameter_mm"} <= cols:
            raise ConfigError(f"lesion CSV {path} needs columns x, y, z, diameter_mm")
        for n, raw in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            try:
                xyz = np.array([float(row["x"]), float(row["y"]), float(row["z"])])
                d = float(row["diameter_mm"])
            except ValueError as exc:
                raise ConfigError(f"lesion CSV {path} row {n}: not a number ({exc})") from exc
            kind = row.get("kind") or "cmb"
            if kind not in ("cmb", "calcification", "iron"):
                raise ConfigError(
                    f"lesion CSV {path} row {n}: kind must be cmb, calcification or iron, got {kind!r}")
            lps = ras_to_lps(xyz) if space == "RAS" else xyz
            out.append(_lesion_record(kind, lps, d, mars_region=row.get("mars_region"),
                                      mars_category=row.get("mars_category")))
    return out


def truth_record(subject: RealSubject, *, calcification_label: int | None = None) -> dict:
    """The truth.json record of one manifest subject (``"simulated": false``)."""
    if subject.label is None:
        lesions = []
    elif _is_nifti(subject.label):
        lesions = lesions_from_mask(subject.label, calcification_label=calcification_label)
    else:
        lesions = lesions_from_csv(subject.label, subject.label_space)
    cmbs = [l for l in lesions if l["kind"] == "cmb"]
    return {
        "truth_version": TRUTH_VERSION,
        "simulated": False,
        "subject_id": subject.subject_id,
        "control": subject.control,
        "split": subject.split,
        "source": {"image": str(subject.image), "image_kind": subject.image_kind,
                   "label": None if subject.label is None else str(subject.label)},
        "lesions": lesions,
        "counts": {
            "cmb": len(cmbs),
            "calcification": sum(1 for l in lesions if l["kind"] == "calcification"),
            "cmb_by_region": dict(Counter(l["mars_region"] or "unknown" for l in cmbs)),
            "cmb_by_size": {"2-5mm": sum(1 for l in cmbs if l["diameter_mm"] < 5.0),
                            "5-10mm": sum(1 for l in cmbs if l["diameter_mm"] >= 5.0)},
        },
    }


def write_truth(
    subjects: list[RealSubject], out_dir: str | Path, *, calcification_label: int | None = None
) -> list[Path]:
    """Write ``out_dir/<subject>/truth/truth.json`` for every subject; returns the paths."""
    paths = []
    for s in subjects:
        p = Path(out_dir) / s.subject_id / "truth" / "truth.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(truth_record(s, calcification_label=calcification_label), indent=1) + "\n")
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.realdata", description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--calcification-label", type=int, default=None,
                    help="label value of calcifications in NIfTI masks "
                         "(default: every non-zero value is a microbleed)")
    a = ap.parse_args(argv)
    try:
        subjects = load_manifest(a.manifest)
        paths = write_truth(subjects, a.out, calcification_label=a.calcification_label)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = sum(len(json.loads(p.read_text())["lesions"]) for p in paths)
    print(f"wrote {len(paths)} truth files with {n} reference lesions under {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
