"""Vendor phase scaling rules and image-component detection on hand-made values."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement

from core.dicom.classic import component_from_image_type, frames_from_classic, ge_image_type_code
from core.dicom.phase_scaling import phase_to_radians, wrap
from core.errors import DicomInputError

PI = np.pi


def _full(lo: float, hi: float, n: int = 4096) -> np.ndarray:
    return np.linspace(lo, hi, n)


def test_siemens_rescaled_values():
    v = np.concatenate([_full(-4096, 4094), [-4096, 0, 2048, -2048]])
    rad, desc = phase_to_radians(v, manufacturer="SIEMENS", slopes_intercepts={(2.0, -4096.0)})
    np.testing.assert_allclose(rad[-4:], [-PI, 0, PI / 2, -PI / 2], atol=1e-6)
    assert "pi/4096" in desc


def test_siemens_without_rescale_stored_12_bit():
    v = np.concatenate([np.arange(4096.0), [0, 2048, 3072]])
    rad, desc = phase_to_radians(v, manufacturer="SIEMENS", slopes_intercepts={(1.0, 0.0)})
    np.testing.assert_allclose(rad[-3:], [-PI, 0, PI / 2], atol=1e-6)
    assert "2048" in desc


@pytest.mark.parametrize("maker", ["Philips Medical Systems", "ACME"])
def test_radians_by_range(maker):
    v = np.concatenate([_full(-PI, PI), [1.0, -2.5]])
    rad, desc = phase_to_radians(v, manufacturer=maker)
    np.testing.assert_allclose(rad[-2:], [1.0, -2.5], atol=1e-6)
    assert "radians" in desc and "milli" not in desc


def test_zero_to_two_pi_radians_are_wrapped():
    v = np.concatenate([_full(0, 2 * PI), [1.5 * PI]])
    rad, _ = phase_to_radians(v, manufacturer="Philips")
    assert rad[-1] == pytest.approx(-0.5 * PI, abs=1e-6)


def test_milliradians_by_range_and_without_wraps():
    v = np.concatenate([_full(-1000 * PI, 1000 * PI), [1500.0]])
    rad, desc = phase_to_radians(v, manufacturer="Philips Medical Systems")
    assert rad[-1] == pytest.approx(1.5, abs=1e-6) and "milliradians" in desc
    # a phase image with no wrap at all: -500..800 mrad is still milliradians
    rad, desc = phase_to_radians(np.array([-500.0, 800.0, 100.0]), manufacturer="Philips")
    np.testing.assert_allclose(rad, [-0.5, 0.8, 0.1], atol=1e-6)


def test_rescale_type_decides_small_values():
    small = np.array([-2.0, 0.5, 2.0])
    rad, desc = phase_to_radians(small, manufacturer="Philips", rescale_type="mrad")
    np.testing.assert_allclose(rad, [-0.002, 0.0005, 0.002], atol=1e-7)
    assert "RescaleType mrad" in desc
    rad, _ = phase_to_radians(small, manufacturer="Philips", rescale_type="rad")
    np.testing.assert_allclose(rad, small, atol=1e-6)


@pytest.mark.parametrize(
    "values,kwargs,match",
    [
        (_full(-8192, 8188), {"manufacturer": "Philips"}, "neither radians nor milliradians"),
        (_full(10, 30000), {"manufacturer": "ACME"}, "neither radians nor milliradians"),
        (_full(-3141, 3141), {"manufacturer": "Philips", "rescale_type": "rad"}, "says radians"),
        (_full(-9000, 9000), {"manufacturer": "Philips", "rescale_type": "mrad"}, "says mrad"),
        (_full(-9000, 9000), {"manufacturer": "SIEMENS", "slopes_intercepts": {(2.0, -4096.0)}}, "outside -4096"),
        (np.array([0.0, np.nan]), {"manufacturer": "Philips"}, "non-finite"),
        (np.array([]), {"manufacturer": "Philips"}, "no pixels"),
    ],
)
def test_unknown_scalings_are_refused(values, kwargs, match):
    with pytest.raises(DicomInputError, match=match):
        phase_to_radians(values, **kwargs)


def test_wrap_is_half_open_in_float32():
    x = np.array([PI, -PI, np.nextafter(PI, 0), 3 * PI, -3 * PI, 7.0])
    w = wrap(x)
    assert w.dtype == np.float32
    assert np.all(w >= -np.float32(PI)) and np.all(w < np.float32(PI))
    np.testing.assert_allclose(np.cos(w), np.cos(x), atol=1e-6)
    np.testing.assert_allclose(np.sin(w), np.sin(x), atol=1e-6)


@pytest.mark.parametrize(
    "image_type,ge,expected",
    [
        (["ORIGINAL", "PRIMARY", "M", "ND"], None, "M"),
        (["ORIGINAL", "PRIMARY", "P", "ND"], None, "P"),
        (["ORIGINAL", "PRIMARY", "M", "ND", "NORM"], None, "M"),
        (["ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"], None, "M"),
        (["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"], None, "P"),
        (["ORIGINAL", "PRIMARY", "R_FFE", "R", "FFE"], None, "R"),
        (["ORIGINAL", "PRIMARY", "I_FFE", "I", "FFE"], None, "I"),
        (["ORIGINAL", "PRIMARY", "PHASE"], None, "P"),
        (["ORIGINAL", "PRIMARY", "MAGNITUDE"], None, "M"),
        (["ORIGINAL", "PRIMARY", "OTHER"], 2, "R"),
        (["ORIGINAL", "PRIMARY", "OTHER"], 3, "I"),
        (["ORIGINAL", "PRIMARY", "OTHER"], 0, "M"),
        (["ORIGINAL", "PRIMARY", "OTHER"], 1, "P"),
        (["ORIGINAL", "PRIMARY", "OTHER"], None, None),
        (["DERIVED", "PRIMARY", "MPR"], None, None),
        (["M"], None, None),  # values 1 and 2 are not component values
    ],
)
def test_component_from_image_type(image_type, ge, expected):
    assert component_from_image_type(image_type, ge) == expected


def test_ge_code_from_implicit_vr_bytes():
    ds = pydicom.Dataset()
    ds.add_new(0x00430010, "LO", "GEMS_PARM_01")
    ds[0x0043102F] = DataElement(0x0043102F, "UN", (3).to_bytes(2, "little", signed=True))
    assert ge_image_type_code(ds) == 3
    assert ge_image_type_code(pydicom.Dataset()) is None


def _plane(**extra) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = 2, 3
    ds.PixelData = b"\x00" * 12
    for k, v in extra.items():
        setattr(ds, k, v)
    return ds


def test_field_strength_sources():
    assert frames_from_classic(_plane(MagneticFieldStrength=3))[0].field_strength_t == 3.0
    assert frames_from_classic(_plane(MagneticFieldStrength=15000))[0].field_strength_t == 1.5  # gauss
    assert frames_from_classic(_plane(ImagingFrequency=127.74))[0].field_strength_t == 3.0
    assert frames_from_classic(_plane())[0].field_strength_t is None


def test_plane_without_geometry_gives_no_frame():
    ds = _plane()
    del ds.ImagePositionPatient
    assert frames_from_classic(ds) == []
    ds = _plane()
    del ds.PixelData
    assert frames_from_classic(ds) == []
