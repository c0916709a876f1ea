"""operators.study_summary.write_study_summary: summary.json always, input copies on request."""

from __future__ import annotations

import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from core.geometry import Geometry
from operators.study_summary import write_study_summary


def _gre():
    g = Geometry(shape=(6, 5, 4), affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    mag = np.arange(2 * 6 * 5 * 4, dtype=np.float32).reshape(2, 6, 5, 4)
    return SimpleNamespace(magnitude=mag, phase_rad=mag / 100.0, geometry=g,
                           summary=lambda: {"n_echoes": 2})


@pytest.mark.parametrize("copies", [True, False])
def test_input_copies_only_when_asked(tmp_path, copies):
    s = write_study_summary(_gre(), tmp_path, input_copies=copies)
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert s["input"] == {"n_echoes": 2}
    names = {"magnitude.nii.gz", "phase.nii.gz"}
    assert (names <= set(s["files"])) is copies
    assert all((tmp_path / n).exists() is copies for n in names)
    if copies:
        img = nib.load(tmp_path / "magnitude.nii.gz")
        assert img.shape == (6, 5, 4, 2)
        assert np.array_equal(np.asarray(img.dataobj)[..., 1], _gre().magnitude[1])
