"""Path-following unwrapping of the first echo, temporal unwrapping of the later echoes, the fit
residual, and the reliable-phase mask the chain gives background removal."""

import numpy as np
import pytest

from core.physics import wrap
from core.qsm import pipeline as P
from core.qsm.echo_fit import fit_residual_rad, temporal_unwrap
from core.qsm.unwrap import laplacian_unwrap, path_unwrap

SHAPE = (40, 40, 32)
SPACING = (1.0, 1.0, 1.0)
DTE = np.array([1.0, 2.0, 3.0, 4.0]) * 1e-3  # s


def _steep_frequency():
    """A frequency (rad/s) whose first-echo phase rises 1.1 rad per voxel along i (plus a blob):
    spatially unwrappable at TE 1 ms, but 4.4 rad per voxel (aliased) at TE 4 ms."""
    idx = np.indices(SHAPE).astype(np.float64)
    c = [(n - 1) / 2 for n in SHAPE]
    r2 = sum((idx[a] - c[a]) ** 2 for a in range(3))
    phase_1ms = 1.1 * (idx[0] - c[0]) + 6.0 * np.exp(-r2 / (2 * 8.0**2))
    mask = r2 < 14.0**2
    return (phase_1ms / DTE[0]).astype(np.float32), mask


def test_temporal_unwrapping_recovers_echoes_that_spatial_unwrapping_cannot():
    omega, mask = _steep_frequency()
    true = omega[None] * DTE[:, None, None, None].astype(np.float32)
    wrapped = wrap(true).astype(np.float32)
    # echo 4 wraps several times per voxel step: Laplacian unwrapping gets it badly wrong
    lap = laplacian_unwrap(wrapped[3], SPACING)
    e = (lap - true[3])[mask]
    assert np.sqrt(np.mean((e - e.mean()) ** 2)) > 3.0  # rad
    first = path_unwrap(wrapped[0], mask)
    weights = np.ones_like(wrapped)
    un, omega_est = temporal_unwrap(wrapped, first, weights, DTE, mask)
    assert un.shape == wrapped.shape and omega_est.dtype == np.float32
    for j in range(4):
        d = (un[j] - true[j])[mask]
        assert np.ptp(d) < 1e-3  # exact up to one constant per echo
    d = (omega_est - omega)[mask]
    assert np.ptp(d) * DTE[0] < 1e-3
    res = fit_residual_rad(un, weights, DTE, omega_est)
    assert float(res[mask].max()) < 1e-3


def test_temporal_unwrapping_survives_a_2pi_error_of_the_first_echo_with_uneven_echo_spacing():
    omega, mask = _steep_frequency()
    omega = omega * np.float32(0.5)
    dte = np.array([1.0, 2.3, 3.9]) * 1e-3
    true = omega[None] * dte[:, None, None, None].astype(np.float32)
    wrapped = wrap(true).astype(np.float32)
    first = path_unwrap(wrapped[0], mask) + np.float32(2 * np.pi)  # wrong by one turn everywhere
    un, omega_est = temporal_unwrap(wrapped, first, np.ones_like(wrapped), dte, mask)
    d = (omega_est - omega)[mask]
    # a constant frequency offset is harmless (background removal drops it); no voxel may differ
    assert np.ptp(d) * dte[-1] < 1e-2


def test_fit_residual_flags_an_inconsistent_echo():
    omega, mask = _steep_frequency()
    un = omega[None] * DTE[:, None, None, None].astype(np.float32)
    un[2, :5] += 2.0  # a region where echo 3 does not follow the linear model
    res = fit_residual_rad(un, np.ones_like(un), DTE, omega)
    assert float(res[:5].min()) > 0.5 and float(res[5:].max()) < 1e-4


def test_path_unwrap_is_congruent_and_recovers_a_many_times_wrapped_blob():
    idx = np.indices(SHAPE).astype(np.float64)
    c = [(n - 1) / 2 for n in SHAPE]
    r2 = sum((idx[a] - c[a]) ** 2 for a in range(3))
    true = (25.0 * np.exp(-r2 / (2 * 9.0**2))).astype(np.float32)
    mask = r2 < 15.0**2
    got = path_unwrap(wrap(true), mask)
    k = (got - wrap(true))[mask] / (2 * np.pi)
    assert np.abs(k - np.round(k)).max() < 1e-4  # congruent
    d = (got - true)[mask]
    assert np.ptp(d) < 1e-4
    assert np.all(got[~mask] == 0)
    with pytest.raises(ValueError):
        path_unwrap(true[None], mask)


def _ball_brain() -> tuple[np.ndarray, np.ndarray]:
    """Squared distance (voxels^2) from the grid centre, and a 14-voxel-radius ball 'brain'."""
    idx = np.indices(SHAPE).astype(np.float64)
    c = [(n - 1) / 2 for n in SHAPE]
    r2 = sum((idx[a] - c[a]) ** 2 for a in range(3))
    return r2, r2 < 14.0**2


def test_reliable_mask_drops_signal_dropout_and_misfit_and_erodes():
    r2, mask = _ball_brain()
    last = np.ones(SHAPE, np.float32)
    last[:12] = 0.2  # dropout slab below DROPOUT_FRACTION of the median
    residual = np.zeros(SHAPE, np.float32)
    residual[:, :, 24:] = 1.0  # misfit above RESIDUAL_MAX_RAD
    rel = P.reliable_mask(mask, last, SPACING, residual)
    assert not rel[:12 + int(P.RELIABLE_ERODE_MM)].any()
    assert not rel[:, :, 24 - int(P.RELIABLE_ERODE_MM):].any()
    assert not np.any(rel & ~mask)
    inner = (r2 < (14.0 - P.RELIABLE_ERODE_MM - 1) ** 2)
    inner[:15] = False
    inner[:, :, 21:] = False
    assert np.all(rel[inner])


def test_reliable_mask_keeps_dark_lesions_enclosed_by_brain():
    r2, mask = _ball_brain()
    last = np.ones(SHAPE, np.float32)
    bleed = r2 < 3.0**2  # a microbleed: dark on the last echo, phase misfit inside
    last[bleed] = 0.05
    residual = np.where(bleed, 2.0, 0.0).astype(np.float32)
    rel = P.reliable_mask(mask, last, SPACING, residual)
    assert np.all(rel[bleed])


def test_inpaint_harmonic_recovers_a_harmonic_field_in_a_hole():
    idx = np.indices(SHAPE).astype(np.float32)
    field = 0.01 * idx[0] - 0.02 * idx[2] + 0.003 * (idx[0] ** 2 - idx[1] ** 2)  # harmonic
    c = [(n - 1) / 2 for n in SHAPE]
    hole = sum((idx[a] - c[a]) ** 2 for a in range(3)) < 4.0**2
    damaged = field.copy()
    damaged[hole] = 5.0  # garbage where a microbleed's phase is noise
    got = P.inpaint_harmonic(damaged, hole)
    assert np.all(got[~hole] == damaged[~hole])
    assert np.abs(got[hole] - field[hole]).max() < 2e-3 * np.ptp(field[hole]) + 1e-4


def _inpaint_dense(values, holes, iterations=200):
    """The dense form of inpaint_harmonic's Jacobi iterations (edge-padded 6-neighbour mean over
    the whole array), which the sparse gather must reproduce exactly."""
    from scipy import ndimage as ndi
    v = np.asarray(values, np.float32).copy()
    rim = ndi.binary_dilation(holes) & ~holes
    v[holes] = float(v[rim].mean())
    for _ in range(iterations):
        p = np.pad(v, 1, mode="edge")
        nb = (p[2:, 1:-1, 1:-1] + p[:-2, 1:-1, 1:-1] + p[1:-1, 2:, 1:-1] + p[1:-1, :-2, 1:-1]
              + p[1:-1, 1:-1, 2:] + p[1:-1, 1:-1, :-2]) / 6.0
        v[holes] = nb[holes]
    return v


def test_inpaint_harmonic_equals_the_dense_jacobi_iterations_bit_for_bit():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(12, 13, 14)).astype(np.float32)
    holes = rng.random(values.shape) < 0.2
    holes[0, 0, :4] = holes[-1, -1, -1] = holes[5, 0, 7] = True  # holes on the array's faces
    got = P.inpaint_harmonic(values, holes, iterations=37)
    assert np.array_equal(got, _inpaint_dense(values, holes, iterations=37))
