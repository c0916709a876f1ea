"""The clinical summary of a study's microbleeds: counts, MARS table, sizes, distribution pattern.

:func:`clinical_summary` gives a JSON-friendly dict and :func:`summary_text` the plain text a
radiologist reads (key-image captions, the app's ``summary.txt``). Wording follows MARS (Gregoire
et al., Neurology 2009;73:1759-1766: regions, categories lobar / deep / infratentorial, *definite*
/ *possible*) and the Boston criteria version 2.0 for cerebral amyloid angiopathy (Charidimou et
al., Lancet Neurol 2022;21:714-725):

* probable CAA needs, besides the imaging, age >= 50 years and a clinical presentation
  (spontaneous intracerebral haemorrhage, transient focal neurological episodes or cognitive
  impairment / dementia), at least two strictly lobar haemorrhagic lesions (ICH, microbleeds,
  cortical superficial siderosis foci) *or* one lobar haemorrhagic lesion plus one white-matter
  feature (severe centrum semiovale perivascular spaces or multispot white-matter
  hyperintensities), and the absence of deep haemorrhagic lesions and of other causes;
* possible CAA: one strictly lobar haemorrhagic lesion or one white-matter feature (same
  clinical requirements);
* cerebellar haemorrhagic lesions count neither as lobar nor as deep; brainstem lesions are
  counted as deep here (supratentorial deep and brainstem locations are the "deep" territory of
  hypertensive arteriolopathy).

The statement is a pattern description, never a diagnosis: the product sees only microbleeds on
QSM, not age, history, ICH, siderosis or white-matter markers, and every statement says so.
"""

from __future__ import annotations

from collections import Counter

from core.findings import Finding, StudyFindings
from core.mars import MARS_REGIONS, REGION_BY_KEY

PATTERNS = ("none", "strictly lobar", "strictly deep", "mixed", "infratentorial only")
CAVEAT = ("The Boston criteria v2.0 also require age >= 50 years, a compatible clinical presentation, "
          "assessment of intracerebral haemorrhage, cortical superficial siderosis and white-matter "
          "features, and exclusion of other causes; this automated count does not assess those.")


def _boston_counts(cmbs: list[Finding]) -> tuple[int, int, int]:
    """(lobar, deep incl. brainstem, cerebellar) microbleed counts."""
    lobar = sum(f.mars_category == "lobar" for f in cmbs)
    deep = sum(f.mars_category == "deep" or f.mars_region == "brainstem" for f in cmbs)
    cerebellar = sum(f.mars_region == "cerebellum" for f in cmbs)
    return lobar, deep, cerebellar


def distribution_pattern(cmbs: list[Finding]) -> str:
    """One of :data:`PATTERNS` from the MARS categories of the microbleeds."""
    if not cmbs:
        return "none"
    cats = {f.mars_category for f in cmbs}
    lobar = "lobar" in cats
    deep = "deep" in cats or any(f.mars_region == "brainstem" for f in cmbs)
    if lobar and deep:
        return "mixed"
    if lobar:
        return "strictly lobar"
    if "deep" in cats:
        return "strictly deep"
    return "infratentorial only"


def pattern_statement(cmbs: list[Finding]) -> str:
    """The distribution sentence, in Boston criteria v2.0 wording, with its caveat."""
    pattern = distribution_pattern(cmbs)
    lobar, deep, cerebellar = _boston_counts(cmbs)
    if pattern == "none":
        text = "No cerebral microbleeds detected."
    elif pattern == "strictly lobar":
        n = "two or more" if lobar >= 2 else "one"
        grade = ("probable cerebral amyloid angiopathy" if lobar >= 2
                 else "possible cerebral amyloid angiopathy")
        text = (f"Strictly lobar distribution: {lobar} lobar microbleed(s), no deep haemorrhagic lesion"
                f"{'; cerebellar microbleeds are not counted as lobar or deep' if cerebellar else ''}. "
                f"With {n} strictly lobar haemorrhagic lesion(s) this imaging pattern is compatible with "
                f"{grade} (Boston criteria v2.0) if the clinical requirements are met.")
    elif pattern == "strictly deep":
        text = (f"Strictly deep distribution: {deep} deep microbleed(s), no lobar microbleed. A deep "
                "haemorrhagic lesion excludes probable and possible CAA under the Boston criteria v2.0; "
                "this pattern is typical of hypertensive arteriolopathy.")
    elif pattern == "mixed":
        text = (f"Mixed distribution: {lobar} lobar and {deep} deep microbleed(s). The presence of deep "
                "haemorrhagic lesions means the Boston criteria v2.0 for probable or possible CAA are not "
                "met; mixed patterns are most often attributed to hypertensive arteriolopathy, with or "
                "without concomitant CAA.")
    else:
        text = (f"Infratentorial only: {deep} brainstem and {cerebellar} cerebellar microbleed(s), none "
                "supratentorial. Cerebellar microbleeds count neither as lobar nor as deep under the "
                "Boston criteria v2.0; brainstem microbleeds are deep haemorrhagic lesions.")
    return f"{text} {CAVEAT}"


def clinical_summary(findings: StudyFindings) -> dict:
    """Counts, MARS table, sizes, mimics and the pattern statement (JSON-friendly).

    Keys: ``n_microbleeds``, ``n_definite``, ``n_possible``, ``by_category`` (lobar / deep /
    infratentorial), ``mars_table`` (one row per region with microbleeds: region, display name,
    category, left / right / midline counts each split definite / possible, total),
    ``size_classes`` (``2-5mm`` / ``5-10mm``), ``microbleeds`` (index, region, side, diameter,
    certainty), ``mimics``, ``pattern``, ``pattern_statement`` and ``text``
    (:func:`summary_text`).
    """
    cmbs = sorted(findings.microbleeds, key=lambda f: f.index)
    table = []
    for region in MARS_REGIONS:
        here = [f for f in cmbs if f.mars_region == region.key]
        if not here:
            continue
        row = {"region": region.key, "name": region.display_name, "category": region.category,
               "total": len(here)}
        for side in ("left", "right", "midline"):
            row[side] = {c: sum(f.side == side and f.certainty == c for f in here) for c in ("definite", "possible")}
        table.append(row)
    unlocated = [f.index for f in cmbs if f.mars_region not in REGION_BY_KEY]
    cat = Counter(f.mars_category for f in cmbs)
    summary = {
        "n_microbleeds": len(cmbs),
        "n_definite": sum(f.certainty == "definite" for f in cmbs),
        "n_possible": sum(f.certainty == "possible" for f in cmbs),
        "by_category": {c: cat.get(c, 0) for c in ("lobar", "deep", "infratentorial")},
        "mars_table": table,
        "unlocated": unlocated,
        "size_classes": {s: sum(f.size_class == s for f in cmbs) for s in ("2-5mm", "5-10mm")},
        "microbleeds": [
            {"index": f.index, "region": f.mars_region, "side": f.side, "category": f.mars_category,
             "diameter_mm": round(float(f.diameter_mm), 1), "size_class": f.size_class,
             "certainty": f.certainty, "probability": round(float(f.probability), 3)} for f in cmbs],
        "mimics": [
            {"index": f.index, "kind": f.kind, "region": f.mars_region, "side": f.side,
             "diameter_mm": round(float(f.diameter_mm), 1), "mean_chi_ppm": round(float(f.mean_chi_ppm), 3)}
            for f in sorted(findings.mimics, key=lambda f: f.index)],
        "pattern": distribution_pattern(cmbs),
        "pattern_statement": pattern_statement(cmbs),
    }
    summary["text"] = summary_text(summary)
    return summary


def _region_name(key: str | None) -> str:
    return REGION_BY_KEY[key].display_name if key in REGION_BY_KEY else "unlocated"


def summary_text(summary: dict) -> str:
    """Plain-text rendering of :func:`clinical_summary`'s dict."""
    n = summary["n_microbleeds"]
    lines = [f"Cerebral microbleeds (QSM): {n} ({summary['n_definite']} definite, {summary['n_possible']} possible)"]
    c = summary["by_category"]
    lines.append(f"MARS categories: lobar {c['lobar']}, deep {c['deep']}, infratentorial {c['infratentorial']}")
    if summary["mars_table"]:
        lines.append("MARS region           left (def/pos)  right (def/pos)  midline (def/pos)  total")
        for r in summary["mars_table"]:
            cells = [f"{r[s]['definite']}/{r[s]['possible']}" for s in ("left", "right", "midline")]
            lines.append(f"  {r['name'][:20]:<20} {cells[0]:>8}  {cells[1]:>14}  {cells[2]:>16}  {r['total']:>6}")
    s = summary["size_classes"]
    lines.append(f"Size: 2-5 mm {s['2-5mm']}, 5-10 mm {s['5-10mm']}")
    for m in summary["microbleeds"]:
        lines.append(f"  #{m['index']}: {_region_name(m['region'])} {m['side'] or ''}, {m['diameter_mm']:.1f} mm, "
                     f"{m['certainty']}")
    if summary["mimics"]:
        lines.append("Mimics (not counted as microbleeds):")
        for m in summary["mimics"]:
            lines.append(f"  #{m['index']}: {m['kind']}, {_region_name(m['region'])} {m['side'] or ''}, "
                         f"{m['diameter_mm']:.1f} mm, {m['mean_chi_ppm']:+.3f} ppm")
    lines.append(f"Distribution: {summary['pattern']}. {summary['pattern_statement']}")
    return "\n".join(lines)
