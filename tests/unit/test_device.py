"""core.device.select_device and, where torch sees CUDA, CPU/GPU agreement of the torch steps.

The agreement tests are skipped on machines without CUDA (CI has none); on a GPU machine they
check the stated tolerance: the QSM chain within 1e-3 ppm (float32 FFTs in another order) and the
networks' probabilities within 1e-4.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from core.device import select_device
from core.errors import ConfigError
from core.geometry import Geometry
from core.qsm import reconstruct
from core.qsm.phantom import head_phantom
from tests.conftest import REPO

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (CPU/GPU agreement needs one)")


def test_auto_and_cpu():
    assert select_device("cpu") == "cpu"
    assert select_device(None) == select_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "gpu0"])
def test_unknown_device_refused(bad):
    if torch.cuda.is_available() and bad == "cuda:x":
        pytest.skip("CUDA present: cuda:x is refused for its index instead")
    with pytest.raises(ConfigError):
        select_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_refused_without_cuda_and_app_exits_2(tmp_path):
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        select_device("cuda")
    proc = subprocess.run([sys.executable, "-m", "app", "-i", str(tmp_path), "-o", str(tmp_path / "out"),
                           "--device", "cuda"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


@cuda
@pytest.mark.parametrize("method", ["star", "tkd"])
def test_qsm_chain_cpu_and_cuda_agree(method):
    shape, spacing = (72, 84, 64), (1.2, 1.2, 1.2)
    geom = Geometry.oblique(shape, spacing, 0.0)
    p = head_phantom(shape, spacing, b0_direction=geom.b0_direction_ijk(), seed=2)
    args = (p.magnitude, p.phase_rad, p.echo_times_s, p.field_strength_t, geom)
    cpu = reconstruct(*args, method=method, device="cpu")
    gpu = reconstruct(*args, method=method, device="cuda")
    assert np.array_equal(cpu.eroded_mask, gpu.eroded_mask)
    assert float(np.abs(cpu.chi_ppm - gpu.chi_ppm).max()) < 1e-3


@cuda
def test_networks_cpu_and_cuda_agree():
    from core.detect.detector import CMBDetector
    from operators.cmb_detector import resolve_model_dir

    cpu = CMBDetector.load(resolve_model_dir(), device="cpu")
    gpu = CMBDetector.load(resolve_model_dir(), device="cuda")
    x = np.random.default_rng(0).normal(0, 0.3, (8, 1, 32, 32, 32)).astype(np.float32)
    for name, net in cpu.networks.items():
        with torch.no_grad():
            a = net(torch.from_numpy(x if name != "convscreen" else x[:, :, :7, :7, :7]))
            b = gpu.networks[name](torch.from_numpy(x if name != "convscreen" else x[:, :, :7, :7, :7]).cuda())
        a = a[0] if isinstance(a, tuple) else a
        b = b[0] if isinstance(b, tuple) else b
        assert float((a - b.cpu()).abs().max()) < 1e-3, name
