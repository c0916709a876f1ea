"""Coded concepts used by the product's DICOM results (SR, SEG), in one place.

Every standard code below was checked against the DICOM PS3.16 tables as shipped with pydicom
(``pydicom/sr/_concepts_dict.py`` and ``_cid_dict.py``: the code value, meaning and the context
groups it belongs to are noted per code). Where PS3.16 offers no concept for what we say
(cerebral microbleed, basal ganglia as one MARS region, deep and periventricular white matter, the
MARS categories, definite/possible), we use the private coding scheme :data:`PRIVATE_SCHEME`,
declared in each SR through CodingSchemeIdentificationSequence (:func:`private_scheme_item`),
rather than invent a SNOMED CT code we could not verify.
"""

from __future__ import annotations

import pydicom
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

#: Private coding scheme designator of the product (declared in every SR we write).
PRIVATE_SCHEME = "99CMBQSM"
PRIVATE_SCHEME_NAME = "CMB-QSM private codes"
PRIVATE_SCHEME_RESPONSIBLE = "CMB-QSM open-source project"


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def private_scheme_item() -> pydicom.Dataset:
    """An item of CodingSchemeIdentificationSequence (0008,0110) declaring :data:`PRIVATE_SCHEME`."""
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_RESPONSIBLE
    return item


# ----------------------------------------------------------------- findings (what was found)
#: No SNOMED CT concept for "cerebral microbleed" could be verified offline: private code.
FINDING_CMB = _private("CMB", "Cerebral microbleed")
FINDING_CALCIFICATION = _private("CALC", "Calcification (microbleed mimic)")
FINDING_IRON = _private("IRON", "Non-haemorrhagic iron deposit (microbleed mimic)")
FINDING_BY_KIND = {"cmb": FINDING_CMB, "calcification": FINDING_CALCIFICATION, "iron": FINDING_IRON}

#: Finding category: SCT 49755003 "Morphologically Abnormal Structure" (CID 7150).
CATEGORY_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure
#: SCT 105590001 "Substance" (CID 7150): category of the iron segment.
CATEGORY_SUBSTANCE = codes.SCT.Substance

# ----------------------------------------------------------------- SEG segment property types
#: SCT 50960005 "Hemorrhage" (CID 7151 Segmentation Property Type): a microbleed is a small haemorrhage.
SEG_TYPE_CMB = codes.SCT.Hemorrhage
#: Calcification: no PS3.16 concept for a single intracranial calcification: private code.
SEG_TYPE_CALCIFICATION = FINDING_CALCIFICATION
#: SCT 3829006 "Iron" (PS3.16, CID 13 / 300).
SEG_TYPE_IRON = codes.SCT.Iron
SEG_LABELS = {"cmb": "Cerebral microbleeds", "calcification": "Calcifications (mimic)",
              "iron": "Iron deposits (mimic)"}

# ----------------------------------------------------------------- MARS regions (finding site)
#: MARS key -> finding-site code. SCT codes as in PS3.16 (CID 7151/7153/7192 for the lobes, insula,
#: thalamus, corpus callosum, brain stem, cerebellum; CID 7702/7710 for the capsules).
REGION_CODES: dict[str, CodedConcept] = {
    "frontal": codes.SCT.FrontalLobe,  # 83251001
    "parietal": codes.SCT.ParietalLobe,  # 16630005
    "temporal": codes.SCT.TemporalLobe,  # 78277001
    "occipital": codes.SCT.OccipitalLobe,  # 31065004
    "insula": codes.SCT.Insula,  # 36169008
    "basal_ganglia": _private("MARS-BG", "Basal ganglia"),
    "thalamus": codes.SCT.Thalamus,  # 42695009
    "internal_capsule": codes.SCT.InternalCapsule,  # 85637007
    "external_capsule": codes.SCT.ExternalCapsule,  # 10517005
    "corpus_callosum": codes.SCT.CorpusCallosum,  # 88442005
    "deep_periventricular_wm": _private("MARS-DPWM", "Deep and periventricular white matter"),
    "brainstem": codes.SCT.BrainStem,  # 119238007
    "cerebellum": codes.SCT.Cerebellum,  # 113305005
}
REGION_CODES = {k: CodedConcept(c.value, c.scheme_designator, c.meaning) for k, c in REGION_CODES.items()}

#: Laterality (CID 245 "Laterality with Median"): SCT Left 7771000, SCT Right 24028007, DCM Median 130290.
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right, "midline": CodedConcept("130290", "DCM", "Median")}

# ----------------------------------------------------------------- measurements
DIAMETER = codes.SCT.Diameter  # SCT 81827009
VOLUME = codes.SCT.Volume  # SCT 118565006
SUSCEPTIBILITY = codes.DCM.MagneticSusceptibility  # DCM 126396 (CID 218, 7180, 7469)
MEAN = codes.SCT.Mean  # SCT 373098007, derivation
PROBABILITY = codes.DCM.Probability  # DCM 122157
#: DCM 111010 "Center": the focus centre (SCOORD3D POINT).
CENTRE = codes.DCM.Center

UNIT_MM = CodedConcept("mm", "UCUM", "millimeter")
UNIT_MM3 = CodedConcept("mm3", "UCUM", "cubic millimeter")
UNIT_PPM = CodedConcept("[ppm]", "UCUM", "parts per million")
UNIT_ONE = CodedConcept("1", "UCUM", "no units")

# ----------------------------------------------------------------- qualitative evaluations
MARS_CATEGORY = _private("MARS-CAT", "MARS category")
CATEGORY_VALUES = {
    "lobar": _private("MARS-LOBAR", "Lobar"),
    "deep": _private("MARS-DEEP", "Deep"),
    "infratentorial": _private("MARS-INFRA", "Infratentorial"),
}
#: DCM 111012 "Certainty of Finding".
CERTAINTY = codes.DCM.CertaintyOfFinding
CERTAINTY_VALUES = {"definite": _private("MARS-DEF", "Definite"), "possible": _private("MARS-POS", "Possible")}
PROCEDURE = CodedConcept("CMB-QSM", PRIVATE_SCHEME, "Cerebral microbleed detection on QSM")
#: TID 1500 row "Qualitative Evaluations" (UMLS C0034375): the report-level container that holds
#: the study summary; its CODE / TEXT children are the report's conclusions (PS3.16 TID 1500; the
#: HL7 DICOM SR to FHIR mapping IG lists it beside DCM 126010 and 126011 as TID 1500's containers).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: DCM 121111 "Summary": the TEXT item with the study's clinical summary.
SUMMARY = CodedConcept(codes.DCM.Summary.value, "DCM", codes.DCM.Summary.meaning)
