"""MARS localisation end to end on one simulated subject (3 mm, oblique): simulate -> magnitude ->
our brain mask -> template registration -> localise the true microbleed centres -> truth regions."""

from __future__ import annotations

import numpy as np

from core.findings import Finding, StudyFindings
from core.localize import localize, mars_table
from core.qsm.mask import brain_mask
from core.registration import register_template
from training.sim.phantom import simulate_subject


def test_simulated_subject_regions_agree_with_truth() -> None:
    study = simulate_subject("loc-int", 7101, voxel_mm=(3.0, 3.0, 3.0), tilt_deg=12.0, n_cmb=15, n_calc=0,
                             echo_times_s=(0.006,))
    mag = study.magnitude[0]
    mask = brain_mask(mag, study.geometry.spacing)
    reg = register_template(mag, mask, study.geometry)
    cmbs = [les for les in study.lesions if les.kind == "cmb" and les.mars_region]
    assert len(cmbs) >= 10
    findings = [Finding(index=i + 1, kind="cmb", centre_lps_mm=les.centre_lps_mm, centre_voxel=les.centre_voxel,
                        diameter_mm=les.diameter_mm, volume_mm3=1.0, mean_chi_ppm=les.chi_ppm, probability=0.9)
                for i, les in enumerate(cmbs)]
    sf = localize(StudyFindings("1.2.3", "test", findings), reg)
    agree = np.mean([f.mars_region == les.mars_region for f, les in zip(sf.findings, cmbs)])
    side = np.mean([f.side == les.side for f, les in zip(sf.findings, cmbs)])
    assert agree >= 0.8, agree
    assert side >= 0.8, side
    table = mars_table(sf)
    assert table["total"]["total"] == len(cmbs)
    assert sum(c["total"] for c in table["categories"].values()) + table["unlocalised"] == len(cmbs)
