"""The DICOM reader on real scanner files from public corpora (tests/data/real/manifest.json).

Developers may not commit fetched DICOM, so the files are not in the repository: the tests run
where ``CMB_REAL_DICOM`` points at a folder holding each corpus (``<name>/In``, ``<name>/Ref``) at
the manifest's commit, and are skipped elsewhere with that reason. For every case the listed
series are merged into one input folder (``*.gz`` decompressed), read with
:func:`core.dicom.reader.load_gre`, and either

* accepted: echo times and grid size as listed; every voxel centre within ``grid_mm`` of the
  dcm2niix reference NIfTI's (Ref/), magnitude proportional to dcm2niix's (vendor scale factors
  differ) within ``magnitude_relative``, phase in radians within ``phase_rad`` (wrapped) of it; or
* refused with a one-line :class:`DicomInputError` that names what the input is.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from core.dicom.reader import load_gre
from core.errors import DicomInputError

MANIFEST = json.loads((Path(__file__).resolve().parents[1] / "data" / "real" / "manifest.json").read_text())
ROOT = Path(os.environ["CMB_REAL_DICOM"]) if os.environ.get("CMB_REAL_DICOM") else None
TOL = MANIFEST["tolerances"]


def _gather(case: dict, dest: Path) -> Path:
    base = ROOT / case["corpus"]
    dest.mkdir(parents=True)
    for rel in case["series"]:
        src = base / rel
        if not src.is_dir():
            pytest.skip(f"{case['corpus']}/{rel} is not under CMB_REAL_DICOM={ROOT}")
        for f in sorted(src.glob(case.get("series_glob", "*"))):
            if not f.is_file():
                continue
            target = dest / f"{len(list(dest.iterdir())):05d}_{f.name.removesuffix('.gz')}"
            if f.suffix == ".gz":
                with gzip.open(f, "rb") as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout)
            else:
                shutil.copyfile(f, target)
    return dest


def _on_our_grid(vol, ref_path: Path) -> tuple[np.ndarray, float]:
    """The reference NIfTI's first volume resampled (by index permutation/flip) onto our grid, and
    the largest distance between our voxel centres and the reference's (mm)."""
    import nibabel as nib

    ref = nib.load(str(ref_path))
    m = np.linalg.inv(ref.affine) @ vol.geometry.nifti_affine()
    perm, shift = np.round(m[:3, :3]), np.round(m[:3, 3])
    ijk = np.indices(vol.geometry.shape).reshape(3, -1)
    ours_mm = (vol.geometry.nifti_affine() @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    idx = perm @ ijk + shift[:, None]
    ref_mm = (ref.affine @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    data = np.asarray(ref.dataobj, dtype=np.float64)
    data = data.reshape(data.shape[:3] + (-1,))[..., 0]
    return data[tuple(idx.astype(int))].reshape(vol.geometry.shape), float(np.abs(ours_mm - ref_mm).max())


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=[c["id"] for c in MANIFEST["cases"]])
def test_real_scanner_dicom(case, tmp_path):
    if ROOT is None:
        pytest.skip("CMB_REAL_DICOM is not set: the real corpora are not in the repository "
                    "(see tests/data/real/manifest.json for what to clone)")
    folder = _gather(case, tmp_path / "input")
    if case["expect"] == "refused":
        with pytest.raises(DicomInputError, match=case["error"]) as err:
            load_gre(folder)
        assert "\n" not in str(err.value)
        return
    vol = load_gre(folder)
    np.testing.assert_allclose(vol.echo_times_s * 1e3, case["echo_times_ms"], atol=1e-3)
    assert list(vol.geometry.shape) == case["shape"]
    for e, (mag_ref, phase_ref) in enumerate(case["ref"]):
        mag, d_mag = _on_our_grid(vol, ROOT / case["corpus"] / mag_ref)
        phase, d_phase = _on_our_grid(vol, ROOT / case["corpus"] / phase_ref)
        assert max(d_mag, d_phase) < TOL["grid_mm"]
        scale = float(np.sum(vol.magnitude[e] * mag) / np.sum(mag * mag))
        assert np.abs(vol.magnitude[e] - scale * mag).max() <= TOL["magnitude_relative"] * np.abs(vol.magnitude[e]).max()
        if np.abs(phase).max() > 2 * np.pi:  # dcm2niix keeps Siemens' stored -4096..4095
            phase = phase * np.pi / 4096
        assert np.abs(np.angle(np.exp(1j * (vol.phase_rad[e] - phase)))).max() < TOL["phase_rad"]
