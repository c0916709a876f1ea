"""Detection metrics for cerebral microbleeds: the hit rule, one-to-one matching, counts and FROC.

The rule (DESIGN.md section 7): a detection is a *hit* when its centre lies within
``max(3 mm, lesion radius + 1.5 mm)`` of a reference lesion centre (distance <= radius, boundary
included). Detections and references are matched **one to one** by an optimal assignment
(:func:`scipy.optimize.linear_sum_assignment`): first the number of hits is maximised, then, among
assignments with that many hits, higher-probability detections are preferred, then closer ones. A
detection left unmatched is a false positive (FP), a reference left unmatched a false negative (FN).
Two detections on one lesion therefore count 1 TP + 1 FP; one detection between two lesions 1 TP +
1 FN.

Reported, as in the seed paper's Tables 2 and 3 and the literature it compares with
(REFERENCES.md, Detection): TP, FN, FP, sensitivity TP/(TP+FN), PPV TP/(TP+FP), FP per subject,
F1; FROC (sensitivity against mean FP per subject over every probability threshold, the
operating-point convention of Dou 2016, Liu 2019, Kim 2023); sensitivity per size class (2-5 mm,
5-10 mm; below 2 mm counts as 2-5 mm, as in :attr:`core.findings.Finding.size_class`) and per MARS
region and category; false positives on controls (fraction of controls without any FP); and
calcifications reported as microbleeds (FP microbleed detections that fall on a calcification under
the same hit rule).

Detections are anything with ``centre_lps_mm`` and ``probability`` (and optionally ``kind``), e.g.
:class:`core.findings.Finding` or a dict; references are the lesion records of the simulator's
``truth.json`` (``kind``, ``centre_lps_mm``, ``diameter_mm``, ``mars_region``, ``mars_category``).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

MIN_HIT_RADIUS_MM = 3.0
"""Smallest hit radius, whatever the lesion size."""

HIT_MARGIN_MM = 1.5
"""Added to the lesion radius for large lesions."""

SIZE_CLASSES = ("2-5mm", "5-10mm")

_EPS_MM = 1e-6  # centres are stored rounded to 1 micrometre; the boundary counts as a hit


def hit_radius_mm(diameter_mm: float) -> float:
    """Largest centre distance that still counts as a hit on a lesion of this diameter."""
    return max(MIN_HIT_RADIUS_MM, 0.5 * float(diameter_mm) + HIT_MARGIN_MM)


def size_class(diameter_mm: float) -> str:
    """``2-5mm`` or ``5-10mm`` (same split as ``Finding.size_class`` and truth.json counts)."""
    return "5-10mm" if float(diameter_mm) >= 5.0 else "2-5mm"


@dataclass(frozen=True)
class Detection:
    """One detected focus as far as scoring is concerned."""

    centre_lps_mm: tuple[float, float, float]
    probability: float = 1.0
    kind: str = "cmb"


@dataclass(frozen=True)
class Reference:
    """One reference (truth) lesion."""

    centre_lps_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str = "cmb"
    mars_region: str | None = None
    mars_category: str | None = None

    @property
    def hit_radius_mm(self) -> float:
        return hit_radius_mm(self.diameter_mm)

    @property
    def size_class(self) -> str:
        return size_class(self.diameter_mm)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def as_detection(obj: Any) -> Detection:
    """A :class:`Detection` from a Finding, a dict (findings.json / stages.json entry) or itself."""
    if isinstance(obj, Detection):
        return obj
    c = _get(obj, "centre_lps_mm")
    if c is None or len(c) != 3:
        raise ValueError(f"detection without a 3-D centre_lps_mm: {obj!r}")
    p = _get(obj, "probability", 1.0)
    kind = str(_get(obj, "kind", "cmb") or "cmb")
    return Detection(tuple(float(v) for v in c), 1.0 if p is None else float(p), kind)


def as_reference(obj: Any) -> Reference:
    """A :class:`Reference` from a truth.json lesion dict, a simulator ``Lesion`` or itself."""
    if isinstance(obj, Reference):
        return obj
    c = _get(obj, "centre_lps_mm")
    if c is None or len(c) != 3:
        raise ValueError(f"reference lesion without a 3-D centre_lps_mm: {obj!r}")
    return Reference(
        centre_lps_mm=tuple(float(v) for v in c),
        diameter_mm=float(_get(obj, "diameter_mm", 0.0) or 0.0),
        kind=str(_get(obj, "kind", "cmb") or "cmb"),
        mars_region=_get(obj, "mars_region"),
        mars_category=_get(obj, "mars_category"),
    )


@dataclass
class Match:
    """Result of matching one subject's detections to its references.

    Attributes:
        tp: ``(detection index, reference index, distance mm)`` per hit.
        fp: indices of unmatched detections.
        fn: indices of unmatched references.
    """

    tp: list[tuple[int, int, float]] = field(default_factory=list)
    fp: list[int] = field(default_factory=list)
    fn: list[int] = field(default_factory=list)

    @property
    def n_tp(self) -> int:
        return len(self.tp)

    @property
    def n_fp(self) -> int:
        return len(self.fp)

    @property
    def n_fn(self) -> int:
        return len(self.fn)


def _centres(items: Sequence[Any]) -> np.ndarray:
    if not items:
        return np.zeros((0, 3))
    return np.asarray([x.centre_lps_mm for x in items], dtype=float).reshape(-1, 3)


def _allowed(dets: Sequence[Detection], refs: Sequence[Reference]) -> tuple[np.ndarray, np.ndarray]:
    """Distance matrix [n_det, n_ref] and the boolean matrix of allowed (hit) pairs."""
    dc, rc = _centres(dets), _centres(refs)
    dist = np.linalg.norm(dc[:, None, :] - rc[None, :, :], axis=-1)
    radius = np.asarray([r.hit_radius_mm for r in refs], dtype=float)
    return dist, dist <= radius[None, :] + _EPS_MM


def _assign(
    dist: np.ndarray, allowed: np.ndarray, prob: np.ndarray, radius: np.ndarray
) -> list[tuple[int, int]]:
    """Maximum-cardinality assignment on allowed pairs; ties broken by probability, then distance."""
    rows = np.flatnonzero(allowed.any(axis=1))
    cols = np.flatnonzero(allowed.any(axis=0))
    if rows.size == 0:
        return []
    a = allowed[np.ix_(rows, cols)]
    closeness = 1.0 - np.clip(dist[np.ix_(rows, cols)] / radius[cols][None, :], 0.0, 1.0)
    secondary = (np.clip(prob[rows], 0.0, 1.0)[:, None] + 1e-3 * closeness) / 1.002  # in [0, 1)
    k = min(len(rows), len(cols))
    # every hit is worth 1; the sum of secondary terms over at most k pairs stays below 1, so the
    # number of hits dominates and probability only breaks ties between maximal assignments
    gain = np.where(a, 1.0 + secondary / (k + 1), 0.0)
    r, c = linear_sum_assignment(-gain)
    return [(int(rows[i]), int(cols[j])) for i, j in zip(r, c) if a[i, j]]


def match(detections: Iterable[Any], references: Iterable[Any]) -> Match:
    """Match detections to references one to one under the hit rule (all kinds taken as given).

    Callers select kinds first (microbleed detections against microbleed references); see
    :func:`evaluate_subject`.
    """
    dets = [as_detection(d) for d in detections]
    refs = [as_reference(r) for r in references]
    if not dets or not refs:
        return Match([], list(range(len(dets))), list(range(len(refs))))
    dist, allowed = _allowed(dets, refs)
    prob = np.asarray([d.probability for d in dets], dtype=float)
    radius = np.asarray([r.hit_radius_mm for r in refs], dtype=float)
    pairs = _assign(dist, allowed, prob, radius)
    hit_d = {i for i, _ in pairs}
    hit_r = {j for _, j in pairs}
    return Match(
        tp=sorted((i, j, float(dist[i, j])) for i, j in pairs),
        fp=[i for i in range(len(dets)) if i not in hit_d],
        fn=[j for j in range(len(refs)) if j not in hit_r],
    )


@dataclass
class Counts:
    """TP / FN / FP over ``n_subjects`` subjects, with the derived rates."""

    tp: int = 0
    fn: int = 0
    fp: int = 0
    n_subjects: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fn + other.fn, self.fp + other.fp,
                      self.n_subjects + other.n_subjects)

    @property
    def sensitivity(self) -> float | None:
        n = self.tp + self.fn
        return self.tp / n if n else None

    @property
    def ppv(self) -> float | None:
        n = self.tp + self.fp
        return self.tp / n if n else None

    @property
    def fp_per_subject(self) -> float | None:
        return self.fp / self.n_subjects if self.n_subjects else None

    @property
    def f1(self) -> float | None:
        d = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / d if d else None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"tp": self.tp, "fn": self.fn, "fp": self.fp, "n_subjects": self.n_subjects}
        for k in ("sensitivity", "ppv", "fp_per_subject", "f1"):
            v = getattr(self, k)
            out[k] = None if v is None else round(float(v), 6)
        return out


@dataclass
class SubjectResult:
    """One subject scored: its microbleed match plus what the cohort summaries need."""

    subject_id: str
    control: bool
    detections: list[Detection]
    references: list[Reference]  # microbleed references only
    match: Match
    calcifications: int = 0
    calcifications_as_cmb: int = 0

    @property
    def counts(self) -> Counts:
        return Counts(self.match.n_tp, self.match.n_fn, self.match.n_fp, 1)


def evaluate_subject(
    subject_id: str,
    detections: Iterable[Any],
    references: Iterable[Any],
    *,
    control: bool = False,
    threshold: float = 0.0,
    kind: str = "cmb",
) -> SubjectResult:
    """Score one subject's ``kind`` detections with probability >= ``threshold``.

    Microbleed detections are matched against microbleed references; the ones left over (FP) are
    matched once more against calcifications to count calcifications reported as microbleeds.
    """
    dets = [d for d in (as_detection(x) for x in detections) if d.kind == kind and d.probability >= threshold]
    refs_all = [as_reference(r) for r in references]
    refs = [r for r in refs_all if r.kind == kind]
    m = match(dets, refs)
    calc = [r for r in refs_all if r.kind == "calcification"]
    n_calc_hit = match([dets[i] for i in m.fp], calc).n_tp if (kind == "cmb" and calc) else 0
    return SubjectResult(subject_id, bool(control), dets, refs, m, len(calc), n_calc_hit)


def cohort_counts(results: Sequence[SubjectResult]) -> Counts:
    """Summed counts over subjects (FP per subject is over every subject, controls included)."""
    total = Counts()
    for r in results:
        total = total + r.counts
    return total


def sensitivity_by(results: Sequence[SubjectResult], key: str) -> dict[str, dict]:
    """Sensitivity per reference attribute: ``size_class``, ``mars_region`` or ``mars_category``.

    Reference lesions without the attribute are grouped under ``"unknown"``.
    """
    hit: dict[str, int] = defaultdict(int)
    tot: dict[str, int] = defaultdict(int)
    for r in results:
        hit_refs = {j for _, j, _ in r.match.tp}
        for j, ref in enumerate(r.references):
            g = getattr(ref, key) or "unknown"
            tot[g] += 1
            hit[g] += j in hit_refs
    return {
        g: {"n": tot[g], "tp": hit[g], "sensitivity": round(hit[g] / tot[g], 6) if tot[g] else None}
        for g in sorted(tot)
    }


def controls_summary(results: Sequence[SubjectResult]) -> dict:
    """False positives on control subjects: how many controls have none, and FP per control."""
    ctrl = [r for r in results if r.control]
    n = len(ctrl)
    zero = sum(1 for r in ctrl if r.match.n_fp == 0)
    fp = sum(r.match.n_fp for r in ctrl)
    return {
        "n_controls": n,
        "n_without_fp": zero,
        "fraction_without_fp": round(zero / n, 6) if n else None,
        "fp_per_control": round(fp / n, 6) if n else None,
    }


def calcification_summary(results: Sequence[SubjectResult]) -> dict:
    """Calcifications in the references and how many were reported as microbleeds."""
    n = sum(r.calcifications for r in results)
    k = sum(r.calcifications_as_cmb for r in results)
    return {"n_calcifications": n, "reported_as_cmb": k,
            "fraction_reported_as_cmb": round(k / n, 6) if n else None}


@dataclass
class Froc:
    """FROC curve: one point per distinct probability threshold, highest threshold first.

    ``sensitivity[i]`` and ``fp_per_subject[i]`` are those obtained by keeping the detections with
    probability >= ``thresholds[i]``; both are non-decreasing along the arrays.
    """

    thresholds: np.ndarray
    sensitivity: np.ndarray
    fp_per_subject: np.ndarray
    n_references: int
    n_subjects: int


def _subject_tp_steps(dets: list[Detection], refs: list[Reference]) -> tuple[np.ndarray, np.ndarray]:
    """TP as a step function of the threshold: (thresholds descending, TP at each).

    Only detections that can hit some reference change TP, so the matching is recomputed at those
    detections' probabilities only, on the small matrix of possible hits.
    """
    if not dets or not refs:
        return np.zeros(0), np.zeros(0, dtype=int)
    dist, allowed = _allowed(dets, refs)
    rel = np.flatnonzero(allowed.any(axis=1))
    if rel.size == 0:
        return np.zeros(0), np.zeros(0, dtype=int)
    prob = np.asarray([d.probability for d in dets], dtype=float)
    radius = np.asarray([r.hit_radius_mm for r in refs], dtype=float)
    steps = np.unique(prob[rel])[::-1]
    tp = []
    for t in steps:
        keep = rel[prob[rel] >= t]
        tp.append(len(_assign(dist[keep], allowed[keep], prob[keep], radius)))
    return steps, np.asarray(tp, dtype=int)


def froc(results: Sequence[SubjectResult]) -> Froc:
    """FROC over a cohort from each subject's (threshold-0) detections and references."""
    per_subject = [np.asarray([d.probability for d in r.detections], float) for r in results]
    all_p = np.concatenate(per_subject or [np.zeros(0)])
    thresholds = np.unique(all_p)[::-1]
    tp = np.zeros(thresholds.size, dtype=int)
    n_det = np.zeros(thresholds.size, dtype=int)
    for r in results:
        p_sorted = np.sort(np.asarray([d.probability for d in r.detections], float))
        n_det += p_sorted.size - np.searchsorted(p_sorted, thresholds, side="left")
        steps, tps = _subject_tp_steps(r.detections, r.references)
        if steps.size:
            # TP at threshold t = TP at the smallest step >= t (steps descending)
            asc = steps[::-1]
            idx = np.searchsorted(asc, thresholds, side="left")  # first step >= t
            val = np.where(idx < asc.size, tps[::-1][np.minimum(idx, asc.size - 1)], 0)
            tp += val
    n_ref = sum(len(r.references) for r in results)
    n_sub = len(results)
    sens = tp / n_ref if n_ref else np.zeros(thresholds.size)
    fps = (n_det - tp) / n_sub if n_sub else np.zeros(thresholds.size)
    return Froc(thresholds, np.asarray(sens, float), np.asarray(fps, float), n_ref, n_sub)


def froc_points(f: Froc, corners_only: bool = False) -> list[dict]:
    """FROC as JSON-ready points ``{threshold, fp_per_subject, sensitivity}``, highest threshold first.

    ``corners_only`` keeps the points where sensitivity rises, and the last point: the step curve
    and :func:`sensitivity_at_fp` are unchanged, while a stage-I list of thousands of candidates
    per subject no longer gives one point per candidate.
    """
    keep = np.ones(f.thresholds.size, dtype=bool)
    if corners_only and keep.size:
        keep[1:] = f.sensitivity[1:] > f.sensitivity[:-1]
        keep[0] = keep[-1] = True
    return [
        {"threshold": round(float(t), 6), "fp_per_subject": round(float(x), 6),
         "sensitivity": round(float(s), 6)}
        for t, x, s in zip(f.thresholds[keep], f.fp_per_subject[keep], f.sensitivity[keep])
    ]


def sensitivity_at_fp(f: Froc, fp_per_subject: float) -> float:
    """Best sensitivity reachable with at most ``fp_per_subject`` mean FP per subject (0 if none)."""
    ok = f.fp_per_subject <= float(fp_per_subject) + 1e-12
    return float(f.sensitivity[ok].max()) if ok.any() else 0.0


FROC_OPERATING_POINTS = (0.5, 1.0, 2.0, 2.87, 4.0, 8.0)
"""Mean FP per subject at which sensitivity is reported (2.87: the seed paper's operating point)."""


def missed_lesions(results: Sequence[SubjectResult]) -> list[dict]:
    """The reference lesions no detection hit (subject, centre, diameter, region), for error analysis."""
    out = []
    for r in results:
        for j in r.match.fn:
            ref = r.references[j]
            out.append({"subject_id": r.subject_id,
                        "centre_lps_mm": [round(float(v), 3) for v in ref.centre_lps_mm],
                        "diameter_mm": round(float(ref.diameter_mm), 3), "mars_region": ref.mars_region})
    return out


def summarise(
    results: Sequence[SubjectResult],
    *,
    with_froc: bool = True,
    froc_results: Sequence[SubjectResult] | None = None,
) -> dict:
    """Everything the benchmark JSON reports for one set of detections over a cohort.

    ``froc_results``: the same subjects scored without a probability threshold, when ``results``
    were thresholded, so the FROC still spans every threshold (default: ``results``).
    """
    total = cohort_counts(results)
    f1s = [r.counts.f1 for r in results if r.counts.f1 is not None]
    out: dict[str, Any] = {
        "counts": total.to_json(),
        "median_subject_f1": round(float(np.median(f1s)), 6) if f1s else None,
        "by_size": sensitivity_by(results, "size_class"),
        "by_mars_region": sensitivity_by(results, "mars_region"),
        "by_mars_category": sensitivity_by(results, "mars_category"),
        "controls": controls_summary(results),
        "calcifications": calcification_summary(results),
        "per_subject": [
            {"subject_id": r.subject_id, "control": r.control, **r.counts.to_json()} for r in results
        ],
    }
    if with_froc:
        f = froc(results if froc_results is None else froc_results)
        out["froc"] = {
            "points": froc_points(f, corners_only=True),
            "n_thresholds": int(f.thresholds.size),
            "sensitivity_at_fp": {str(x): round(sensitivity_at_fp(f, x), 6) for x in FROC_OPERATING_POINTS},
        }
    return out
