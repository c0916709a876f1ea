"""MARS localisation of findings through the template registration, and the MARS count table.

Each finding's centre (subject LPS mm) is mapped to MNI152 RAS by the fitted transform
(:class:`core.registration.TemplateRegistration`) and looked up in the MARS atlas
(:func:`core.mars.region_at`): a point without a region label (label edge, ventricle, sulcal CSF)
takes the nearest region within ``search_mm``; the side comes from the atlas voxel, or from the
sign of MNI x for unlateralised structures (midline within 3 mm). MARS itself is Gregoire et al.,
Neurology 2009;73:1759-1766.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from core import mars
from core.findings import Finding, StudyFindings


class _ToMni(Protocol):
    def subject_to_mni(self, points_lps: np.ndarray) -> np.ndarray: ...


def localize_points(points_lps: np.ndarray, registration: _ToMni, *, search_mm: float = 4.5
                    ) -> list[tuple[str | None, str]]:
    """(region key or None, side) for each subject LPS point ``(n, 3)``."""
    pts = np.atleast_2d(np.asarray(points_lps, dtype=np.float64))
    if len(pts) == 0:
        return []
    atlas = mars.build_mars_atlas()
    ras = np.atleast_2d(registration.subject_to_mni(pts))
    return [atlas.region_at(p, search_mm=search_mm) for p in ras]


def localize(findings: list[Finding] | StudyFindings, registration: _ToMni, *, search_mm: float = 4.5
             ) -> list[Finding] | StudyFindings:
    """Set ``mars_region``, ``mars_category`` and ``side`` on every finding (in place); return the input.

    A finding farther than ``search_mm`` from any region (outside the brain) keeps
    ``mars_region = None`` but still gets a side from MNI x.
    """
    items = findings.findings if isinstance(findings, StudyFindings) else findings
    if not items:
        return findings
    res = localize_points(np.array([f.centre_lps_mm for f in items]), registration, search_mm=search_mm)
    for f, (key, side) in zip(items, res):
        f.mars_region = key
        f.mars_category = mars.category_of(key) if key else None
        f.side = side or None
    return findings


def mars_table(findings: list[Finding] | StudyFindings, *, kind: str = "cmb") -> dict:
    """MARS counts of the microbleeds (``kind``): per region and side, definite / possible.

    Returns ``{"regions": {key: {"left"|"right"|"midline": {"definite", "possible"}, "total"}},
    "categories": {"lobar"|"deep"|"infratentorial": {"definite", "possible", "total"}},
    "unlocalised": n, "total": {"definite", "possible", "total"}}``. Every MARS region and category
    is present (zeros included) so a report can print the full scale.
    """
    items = findings.findings if isinstance(findings, StudyFindings) else findings
    sides = ("left", "right", "midline")
    regions = {r.key: {s: {"definite": 0, "possible": 0} for s in sides} | {"total": 0}
               for r in mars.MARS_REGIONS}
    cats = {c: {"definite": 0, "possible": 0, "total": 0} for c in mars.CATEGORIES}
    total = {"definite": 0, "possible": 0, "total": 0}
    unloc = 0
    for f in items:
        if f.kind != kind:
            continue
        c = f.certainty
        total[c] += 1
        total["total"] += 1
        if not f.mars_region:
            unloc += 1
            continue
        side = f.side if f.side in sides else "midline"
        regions[f.mars_region][side][c] += 1
        regions[f.mars_region]["total"] += 1
        cat = mars.category_of(f.mars_region)
        cats[cat][c] += 1
        cats[cat]["total"] += 1
    return {"regions": regions, "categories": cats, "unlocalised": unloc, "total": total}
