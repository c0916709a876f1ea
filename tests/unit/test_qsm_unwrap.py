"""Laplacian unwrapping recovers a smooth field wrapped several times (up to a constant)."""

import numpy as np
import pytest

from core.physics import wrap
from core.qsm.unwrap import laplacian_symbol, laplacian_unwrap


def _blob(shape, spacing, amplitude, sigma_mm):
    idx = np.indices(shape).astype(np.float64)
    r2 = sum(((idx[a] - (shape[a] - 1) / 2) * spacing[a]) ** 2 for a in range(3))
    return amplitude * np.exp(-r2 / (2 * sigma_mm**2)), r2


def _rel_err(est, true, mask):
    e = (est - true)[mask]
    e = e - e.mean()
    t = true[mask] - true[mask].mean()
    return np.linalg.norm(e) / np.linalg.norm(t)


@pytest.mark.parametrize(
    "method, amplitude, tolerance",
    # sin() shrinks neighbour differences (d - d^3/6): the published form is ~1.5 % low at 0.5 rad/voxel
    [("wrapped_diff", 20.0, 0.01), ("sincos", 8.0, 0.02)],
)
def test_unwrap_recovers_wrapped_smooth_field(method, amplitude, tolerance):
    shape, spacing = (72, 72, 56), (1.0, 1.2, 1.5)
    true, r2 = _blob(shape, spacing, amplitude, 14.0)
    wrapped = wrap(true)
    assert np.abs(true - wrapped).max() > 2 * np.pi - 1e-6  # the field really is wrapped (20 rad: three times)
    mask = r2 < 28.0**2
    est = laplacian_unwrap(wrapped, spacing, method=method)
    assert est.dtype == np.float32 and est.shape == shape
    assert _rel_err(est, true, mask) < tolerance


def test_sincos_underestimates_steep_phase_wrapped_diff_does_not():
    shape, spacing = (72, 72, 56), (1.0, 1.2, 1.5)
    true, r2 = _blob(shape, spacing, 20.0, 14.0)  # up to ~1.3 rad per voxel
    mask = r2 < 28.0**2
    err_sin = _rel_err(laplacian_unwrap(wrap(true), spacing, method="sincos"), true, mask)
    err_diff = _rel_err(laplacian_unwrap(wrap(true), spacing, method="wrapped_diff"), true, mask)
    assert err_sin > 0.03 and err_diff < 1e-3


def test_unwrap_echo_stack_each_echo_on_its_own():
    shape, spacing = (48, 48, 40), (1.0, 1.0, 1.0)
    true, r2 = _blob(shape, spacing, 6.0, 8.0)
    stack = np.stack([wrap(true), wrap(2 * true), wrap(3 * true)])
    est = laplacian_unwrap(stack, spacing)
    mask = r2 < 18.0**2
    assert est.shape == stack.shape
    for e in range(3):
        assert _rel_err(est[e], (e + 1) * true, mask) < 0.01


def test_laplacian_symbol_zero_at_dc_and_matches_continuous_at_low_frequency():
    shape, spacing = (64, 64, 64), (1.0, 1.0, 2.0)
    sym = laplacian_symbol(shape, spacing, half=True).numpy()
    assert sym[0, 0, 0] == 0.0
    # one cycle over the field of view along i: -(2 pi k)^2 with k = 1/(64 mm)
    assert sym[1, 0, 0] == pytest.approx(-((2 * np.pi / 64.0) ** 2), rel=1e-3)
    assert sym[0, 0, 1] == pytest.approx(-((2 * np.pi / 128.0) ** 2), rel=1e-3)
    assert np.all(sym <= 0)
