"""Codes used by SR / SEG: every MARS region is coded, standard codes match DICOM PS3.16."""

from __future__ import annotations

import pydicom.sr._concepts_dict as ps316

from core.mars import MARS_REGIONS
from core.report import codes


def _in_ps316(code) -> bool:
    scheme = ps316.concepts.get(code.scheme_designator, {})
    return any(code.value in entry and entry[code.value][0].lower() == code.meaning.lower()
               for entry in scheme.values())


def test_every_mars_region_has_a_code_and_standard_ones_are_real():
    assert set(codes.REGION_CODES) == {r.key for r in MARS_REGIONS}
    standard = {k: c for k, c in codes.REGION_CODES.items() if c.scheme_designator != codes.PRIVATE_SCHEME}
    assert len(standard) == 11
    assert set(codes.REGION_CODES) - set(standard) == {"basal_ganglia", "deep_periventricular_wm"}
    for key, c in standard.items():
        assert c.scheme_designator == "SCT"
        assert _in_ps316(c), key
    assert codes.REGION_CODES["frontal"].value == "83251001"
    assert codes.REGION_CODES["brainstem"].value == "119238007"


def test_measurement_and_value_codes_are_in_ps316():
    for c in (codes.DIAMETER, codes.VOLUME, codes.SUSCEPTIBILITY, codes.MEAN, codes.PROBABILITY,
              codes.SUMMARY, codes.CERTAINTY, codes.CENTRE, codes.CATEGORY_ABNORMAL,
              codes.SEG_TYPE_CMB, codes.SEG_TYPE_IRON, *codes.LATERALITY.values()):
        assert _in_ps316(c), c
    assert codes.UNIT_PPM.value == "[ppm]" and codes.UNIT_PPM.scheme_designator == "UCUM"


def test_private_codes_use_the_declared_scheme():
    item = codes.private_scheme_item()
    assert item.CodingSchemeDesignator == codes.PRIVATE_SCHEME == "99CMBQSM"
    assert codes.FINDING_CMB.scheme_designator == codes.PRIVATE_SCHEME
    assert {c.meaning for c in codes.CATEGORY_VALUES.values()} == {"Lobar", "Deep", "Infratentorial"}
