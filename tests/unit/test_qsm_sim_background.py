"""The simulator's background field must be removable by background field removal at any slab tilt:
inside the brain, the total field minus the forward field of the truth susceptibility comes only from
sources outside the brain, so V-SHARP must leave almost nothing of it (training.sim.acquire._field_split)."""

import numpy as np
import pytest

from core.physics import forward_field_ppm
from core.qsm.vsharp import vsharp
from training.sim.phantom import simulate_subject


@pytest.mark.parametrize("tilt", [0.0, 15.0])
def test_background_field_is_harmonic_inside_the_brain(tilt):
    st = simulate_subject("bg", 3101, voxel_mm=(2.0, 2.0, 2.0), tilt_deg=tilt, echo_times_s=[0.006, 0.012])
    g = st.geometry
    total = st.extra_truth["field_ppm"]
    background = total - forward_field_ppm(st.chi_ppm, g.spacing, g.b0_direction_ijk(), pad_factor=2.0)
    left, eroded = vsharp(np.where(st.brain_mask, background, 0.0), st.brain_mask, g.spacing)
    rms_left = float(np.sqrt(np.mean(left[eroded] ** 2)))
    local = forward_field_ppm(st.chi_ppm, g.spacing, g.b0_direction_ijk(), pad_factor=2.0)
    rms_local = float(np.std(local[eroded]))
    # measured at 2 mm: 0.004 ppm at 0 and 15 degrees (0.020 ppm at 15 degrees with the plain kernel);
    # the local field RMS is ~0.01 ppm, so the plain kernel fails this at 15 degrees
    assert rms_left < 0.6 * rms_local
