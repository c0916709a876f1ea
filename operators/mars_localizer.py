"""MARS localisation operators: register the MNI T1 template to the GRE and localise every finding.

Thin adapters around :func:`core.registration.register_template` (fixed image: first-echo magnitude
inside the QSM chain's brain mask) and :func:`core.localize.localize` (region, category and side
per finding from the MARS atlas). The registration seconds travel with the findings' summary
(``mars`` output) for summary.json.

The registration needs only the GRE and the QSM chain's mask, not the findings, so
:class:`MarsRegistrationOperator` starts it in a background thread as soon as the QSM exists and
:class:`MarsLocalizerOperator` waits for it after detection: SimpleITK releases the GIL, so it
overlaps the QSM series writing and stage I's single-threaded numpy work on a second core. The
result is the same registration (same call, same inputs, same seed) as running it in line.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

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


_REGISTRATIONS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mars-registration")


def start_registration(gre, qsm, *, deformable: bool = False) -> Future:
    """:func:`core.registration.register_template` of ``gre`` to the atlas in a background thread."""
    return _REGISTRATIONS.submit(register_template, gre.magnitude[0], qsm.mask, gre.geometry,
                                 deformable=deformable)


class MarsRegistrationOperator(Operator):
    """``gre``, ``qsm`` -> the same two passed on, and ``registration``: a :class:`Future` of the
    :class:`TemplateRegistration`, started here and awaited by :class:`MarsLocalizerOperator`."""

    def __init__(self, fragment: Fragment, *args, deformable: bool = False, **kwargs) -> None:
        self.deformable = bool(deformable)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("gre")
        spec.input("qsm")
        spec.output("gre")
        spec.output("qsm")
        spec.output("registration")

    def compute(self, op_input, op_output, context) -> None:
        gre = op_input.receive("gre")
        qsm = op_input.receive("qsm")
        future = start_registration(gre, qsm, deformable=self.deformable)
        op_output.emit(gre, "gre")
        op_output.emit(qsm, "qsm")
        op_output.emit(future, "registration")


class MarsLocalizerOperator(Operator):
    """``registration`` (Future from :class:`MarsRegistrationOperator`), ``findings``
    (StudyFindings) -> ``findings`` localised, ``mars`` (dict: ``table`` from
    :func:`core.localize.mars_table`, ``timings_s``, ``metric``). Its step time is the wait for
    the registration after detection, not the registration's own seconds (those are in ``mars``)."""

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("registration")
        spec.input("findings")
        spec.output("findings")
        spec.output("mars")

    @progress.step("MARS localisation")
    def compute(self, op_input, op_output, context) -> None:
        reg: TemplateRegistration = op_input.receive("registration").result()
        findings = op_input.receive("findings")
        localize(findings, reg)
        table = mars_table(findings)
        op_output.emit(findings, "findings")
        op_output.emit({"table": table, "timings_s": {k: round(v, 3) for k, v in reg.timings_s.items()},
                        "metric": reg.metric, "deformable": reg.deformable}, "mars")
