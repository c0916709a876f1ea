"""MARS localisation operator: register the MNI T1 template to the GRE and localise every finding.

Thin adapter around :func:`core.registration.register_template` (fixed image: first-echo magnitude
inside the QSM chain's brain mask) and :func:`core.localize.localize` (region, category and side
per finding from the MARS atlas). The registration seconds travel with the findings' summary
(``registration`` output) for summary.json.
"""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from core import progress
from core.findings import StudyFindings
from core.localize import localize, mars_table
from core.registration import TemplateRegistration, register_template


def localize_study(gre, qsm, findings: StudyFindings, *, deformable: bool = False
                   ) -> tuple[StudyFindings, TemplateRegistration, dict]:
    """Register, localise ``findings`` in place; return them, the registration and the MARS table."""
    reg = register_template(gre.magnitude[0], qsm.mask, gre.geometry, deformable=deformable)
    localize(findings, reg)
    return findings, reg, mars_table(findings)


class MarsLocalizerOperator(Operator):
    """``gre`` (GREVolume), ``qsm`` (QSMResult), ``findings`` (StudyFindings) -> ``findings`` localised,
    ``mars`` (dict: ``table`` from :func:`core.localize.mars_table`, ``timings_s``, ``metric``)."""

    def __init__(self, fragment: Fragment, *args, deformable: bool = False, **kwargs) -> None:
        self.deformable = bool(deformable)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.input("qsm")
        spec.input("findings")
        spec.output("findings")
        spec.output("mars")

    @progress.step("MARS localisation")
    def compute(self, op_input, op_output, context) -> None:
        gre = op_input.receive("gre")
        qsm = op_input.receive("qsm")
        findings = op_input.receive("findings")
        findings, reg, table = localize_study(gre, qsm, findings, deformable=self.deformable)
        op_output.emit(findings, "findings")
        op_output.emit({"table": table, "timings_s": {k: round(v, 3) for k, v in reg.timings_s.items()},
                        "metric": reg.metric, "deformable": reg.deformable}, "mars")
