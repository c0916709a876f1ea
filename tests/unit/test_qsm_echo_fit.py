"""Echo fit: a known field comes back from synthetic multi-echo phases (with and without offset)."""

import numpy as np
import pytest

from core.physics import field_to_phase, wrap
from core.qsm.echo_fit import fit_field_ppm, fit_frequency_rad_s, remove_phase_offset
from core.qsm.unwrap import laplacian_unwrap

TE = [0.005, 0.010, 0.015, 0.020]
B0 = 3.0


def _case(shape=(56, 56, 48), spacing=(1.0, 1.0, 1.0)):
    idx = np.indices(shape).astype(np.float64)
    c = [(n - 1) / 2 for n in shape]
    r2 = sum(((idx[a] - c[a]) * spacing[a]) ** 2 for a in range(3))
    r2b = sum(((idx[a] - c[a] - d) * spacing[a]) ** 2 for a, d in zip(range(3), (8, -5, 3)))
    field = 0.4 * np.exp(-r2 / (2 * 9.0**2)) - 0.1 * np.exp(-r2b / (2 * 4.0**2))
    field = field.astype(np.float32)  # ppm: ~4 wraps at the last echo
    offset = 0.8 * (idx[1] - c[1]) / shape[1] + 0.6 * ((idx[2] - c[2]) / shape[2]) ** 2 + 1.0
    mask = r2 < 20.0**2
    mag = np.stack([np.exp(-25.0 * te) * np.ones(shape, np.float32) for te in TE])
    return field, offset, mask, mag, spacing


def _rel_err(est, true, mask):
    e = (est - true)[mask]
    e = e - e.mean()
    t = true[mask] - true[mask].mean()
    return float(np.linalg.norm(e) / np.linalg.norm(t))


def test_weighted_fit_is_exact_on_unwrapped_linear_phase():
    field, _, mask, mag, _ = _case()
    phases = np.stack([field_to_phase(field, te, B0) for te in TE]).astype(np.float32)
    est = fit_field_ppm(phases, mag, TE, B0)
    np.testing.assert_allclose(est, field, atol=1e-5)
    omega = fit_frequency_rad_s(phases, mag, TE)
    np.testing.assert_allclose(omega, 2 * np.pi * 42.576e6 * B0 * 1e-6 * field, rtol=1e-4, atol=1e-2)


def test_offset_removal_then_unwrap_then_fit_recovers_field():
    field, offset, mask, mag, spacing = _case()
    wrapped = np.stack([wrap(field_to_phase(field, te, B0) + offset) for te in TE]).astype(np.float32)
    psi, w, dte = remove_phase_offset(wrapped, mag, TE)
    np.testing.assert_allclose(dte, np.array(TE[1:]) - TE[0])
    unwrapped = laplacian_unwrap(psi, spacing)
    est = fit_field_ppm(unwrapped, w, dte, B0, mask)
    assert _rel_err(est, field, mask) < 0.01


def test_without_offset_removal_the_receiver_phase_biases_the_field():
    field, offset, mask, mag, spacing = _case()
    wrapped = np.stack([wrap(field_to_phase(field, te, B0) + offset) for te in TE]).astype(np.float32)
    est = fit_field_ppm(laplacian_unwrap(wrapped, spacing), mag, TE, B0, mask)
    assert _rel_err(est, field, mask) > 0.05  # why conj(echo 1) is the default


def test_single_echo_without_offset():
    field, _, mask, mag, spacing = _case()
    wrapped = wrap(field_to_phase(field, 0.012, B0)).astype(np.float32)[None]
    est = fit_field_ppm(laplacian_unwrap(wrapped, spacing), mag[:1], [0.012], B0, mask)
    assert _rel_err(est, field, mask) < 0.01


def test_weights_and_echo_count_must_agree():
    field, _, _, mag, _ = _case((20, 20, 20))
    with pytest.raises(ValueError):
        fit_field_ppm(np.zeros((3, 20, 20, 20), np.float32), mag, TE, B0)
