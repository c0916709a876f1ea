"""MARS localisation end to end on one simulated subject (3 mm, oblique): simulate -> magnitude ->
our brain mask -> template registration -> localise the true microbleed centres -> truth regions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from core.findings import Finding, StudyFindings
from core.localize import localize, mars_table
from core.qsm.mask import brain_mask
from core.registration import register_template
from operators.mars_localizer import localize_study
from training.sim.phantom import simulate_subject


@pytest.fixture(scope="module")
def study():
    return simulate_subject("loc-int", 7101, voxel_mm=(2.0, 2.0, 2.0), tilt_deg=12.0, n_cmb=15, n_calc=0,
                            echo_times_s=(0.006,))


def _findings(cmbs) -> list[Finding]:
    return [Finding(index=i + 1, kind="cmb", centre_lps_mm=les.centre_lps_mm, centre_voxel=les.centre_voxel,
                    diameter_mm=les.diameter_mm, volume_mm3=1.0, mean_chi_ppm=les.chi_ppm, probability=0.9)
            for i, les in enumerate(cmbs)]


def test_simulated_subject_regions_agree_with_truth(study) -> None:
    mag = study.magnitude[0]
    mask = brain_mask(mag, study.geometry.spacing)
    reg = register_template(mag, mask, study.geometry)
    cmbs = [les for les in study.lesions if les.kind == "cmb" and les.mars_region]
    assert len(cmbs) >= 10
    sf = localize(StudyFindings("1.2.3", "test", _findings(cmbs)), reg)
    agree = np.mean([f.mars_region == les.mars_region for f, les in zip(sf.findings, cmbs)])
    side = np.mean([f.side == les.side for f, les in zip(sf.findings, cmbs)])
    assert agree >= 0.8, agree
    assert side >= 0.8, side
    table = mars_table(sf)
    assert table["total"]["total"] == len(cmbs)
    assert sum(c["total"] for c in table["categories"].values()) + table["unlocalised"] == len(cmbs)


def test_operator_core_localises_with_the_qsm_mask(study) -> None:
    """What MarsLocalizerOperator.compute runs: GREVolume-like + QSMResult-like inputs."""
    gre = SimpleNamespace(magnitude=study.magnitude, geometry=study.geometry)
    qsm = SimpleNamespace(mask=brain_mask(study.magnitude, study.geometry.spacing))
    cmbs = [les for les in study.lesions if les.kind == "cmb" and les.mars_region]
    sf, reg, table = localize_study(gre, qsm, StudyFindings("1.2.3", "test", _findings(cmbs)))
    assert reg.timings_s["total_s"] > 0
    assert all(f.mars_region is not None and f.side in ("left", "right", "midline") for f in sf.findings)
    assert table["total"]["definite"] == len(cmbs)
    assert np.mean([f.mars_category == les.mars_category for f, les in zip(sf.findings, cmbs)]) >= 0.8
