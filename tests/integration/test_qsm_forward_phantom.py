"""Our QSM chain on an independent phantom: qsm-forward's "simple" cylinders, scored with QSM-CI's scorer.

qsm-forward (pinned in requirements-dev.txt) writes a BIDS multi-echo GRE (magnitude + phase per echo,
JSON sidecars) of a 100^3 1 mm phantom: a weak background cylinder and four small cylinders of
0.05, 0.1, 0.2 and 0.5 ppm, with a smooth receiver phase offset and a shim field. Nobody here wrote
it. At 7 T with QSM-CI's default echoes (4/12/20/28 ms) the 0.5 ppm cylinder's field jumps by more
than pi between neighbours over the 8 ms echo spacing: the spatially unwrapped echo difference came
out one cycle high (1.81 ppm instead of 0.48) until core.qsm.echo_fit.echo1_consistency; these tests
hold that fixed and the 3 T result unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.geometry import Geometry
from core.qsm import metrics
from core.qsm.pipeline import reconstruct

pytestmark = pytest.mark.slow


def _qsm_forward() -> str:
    exe = Path(sys.executable).with_name("qsm-forward")
    if exe.exists():
        return str(exe)
    found = shutil.which("qsm-forward")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("qsm-forward is pinned in requirements-dev.txt but not installed")
    pytest.skip("qsm-forward is not installed")


def _simulate(root: Path, b0: float, snr: float | None = None) -> Path:
    cmd = [_qsm_forward(), "simple", str(root), "--B0", str(b0), "--TEs", "0.004", "0.012", "0.020", "0.028"]
    if snr is not None:
        cmd += ["--peak-snr", str(snr)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return root


def _load(root: Path):
    nib = pytest.importorskip("nibabel")
    a = root / "sub-1" / "anat"
    mag = np.stack([nib.load(a / f"sub-1_echo-{e}_part-mag_MEGRE.nii").get_fdata() for e in range(1, 5)])
    ph = np.stack([nib.load(a / f"sub-1_echo-{e}_part-phase_MEGRE.nii").get_fdata() for e in range(1, 5)])
    side = [json.loads((a / f"sub-1_echo-{e}_part-phase_MEGRE.json").read_text()) for e in range(1, 5)]
    d = root / "derivatives" / "qsm-forward" / "sub-1" / "anat"
    chi = nib.load(d / "sub-1_Chimap.nii").get_fdata()
    mask = nib.load(d / "sub-1_mask.nii").get_fdata() > 0
    assert side[0]["B0_dir"] == [0.0, 0.0, 1.0]  # voxel axis k: our Geometry's default (LPS z)
    return (mag.astype(np.float32), ph.astype(np.float32), [s["EchoTime"] for s in side],
            float(side[0]["MagneticFieldStrength"]), chi, mask)


@pytest.fixture(scope="module", params=[3.0, 7.0], ids=["3T", "7T"])
def phantom(request, tmp_path_factory):
    root = _simulate(tmp_path_factory.mktemp(f"qsmforward{int(request.param)}") / "bids", request.param, snr=100)
    mag, ph, te, b0, chi, mask = _load(root)
    res = reconstruct(mag, ph, te, b0, Geometry.from_parameters(mask.shape, (1, 1, 1)), mask=mask)
    return request.param, res, chi, mask


def test_strong_source_not_unwrapped_a_cycle_off(phantom):
    b0, res, chi, mask = phantom
    ref = chi[mask].mean()
    for value in (0.2, 0.5):
        sel = mask & (np.abs(chi - value) < 1e-4)
        got, want = float(res.chi_ppm[sel].mean()), value - ref
        # one cycle of the 8 ms echo difference is 1/(gamma B0 dTE) = 0.42 ppm at 7 T, 0.98 at 3 T
        assert abs(got - want) < 0.1, f"{b0} T: {value} ppm cylinder reconstructed as {got:.3f} (want {want:.3f})"
    if b0 == 7.0:
        assert res.unwrap_corrected_voxels > 1000  # the error was found and flagged
    else:
        assert res.unwrap_corrected_voxels == 0  # nothing to correct: nothing touched


def test_qsm_ci_scores(phantom):
    """QSM-CI's nRMSE / correlation of our chain on this phantom, demeaned truth as the reference."""
    b0, res, chi, mask = phantom
    truth = np.where(mask, chi - chi[mask].mean(), 0.0)
    nrmse = metrics.nrmse(res.chi_ppm, truth, mask)
    corr = metrics.correlation(res.chi_ppm, truth, mask)
    # measured 2026-12-04: 33.4 % at both field strengths (peak SNR 100), correlation 0.95
    assert nrmse < 40.0, nrmse
    assert corr > 0.9, corr
