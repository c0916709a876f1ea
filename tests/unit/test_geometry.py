"""Voxel <-> patient conversions for axial and oblique geometries."""

import numpy as np
import pytest

from core.geometry import Geometry


@pytest.mark.parametrize("tilt", [0.0, 12.5, -30.0, 45.0])
def test_voxel_patient_round_trip_oblique(tilt):
    g = Geometry.oblique((64, 70, 40), (0.9, 0.9, 1.5), tilt_deg=tilt, centre_lps=(3.0, -12.0, 20.0))
    rng = np.random.default_rng(0)
    ijk = rng.uniform(-5, 70, size=(1000, 3))
    back = g.patient_to_voxel(g.voxel_to_patient(ijk))
    np.testing.assert_allclose(back, ijk, atol=1e-9)
    # the volume centre sits on the requested point
    np.testing.assert_allclose(g.voxel_to_patient((np.array(g.shape) - 1) / 2), [3.0, -12.0, 20.0], atol=1e-9)
    np.testing.assert_allclose(g.spacing, (0.9, 0.9, 1.5))
    # distances in mm are preserved along each axis
    d = g.voxel_to_patient([0, 0, 1]) - g.voxel_to_patient([0, 0, 0])
    np.testing.assert_allclose(np.linalg.norm(d), 1.5)


def test_from_dicom_matches_oblique_construction():
    g = Geometry.oblique((32, 30, 20), (0.8, 0.7, 2.0), tilt_deg=17.0)
    h = Geometry.from_dicom(
        rows=30, columns=32, image_orientation=g.image_orientation(), first_position=g.slice_position(0),
        pixel_spacing=g.pixel_spacing(), slice_spacing_mm=2.0, n_slices=20,
    )
    np.testing.assert_allclose(h.affine, g.affine, atol=1e-9)
    assert h.shape == g.shape


def test_nifti_affine_is_ras():
    g = Geometry.from_parameters((4, 4, 4), (1, 2, 3), origin_lps=(10, 20, 30))
    a = g.nifti_affine()
    np.testing.assert_allclose(a[:3, 3], [-10, -20, 30])
    np.testing.assert_allclose(np.diag(a)[:3], [-1, -2, 3])


def test_rejects_sheared_affine():
    a = np.eye(4)
    a[0, 1] = 0.5
    with pytest.raises(ValueError, match="orthogonal"):
        Geometry((4, 4, 4), a)
