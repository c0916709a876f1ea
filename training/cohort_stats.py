"""Statistics of a simulated cohort, read from the ``truth.json`` files of its subjects.

Usage::

    python -m training.cohort_stats DIR [DIR ...]

Each DIR is searched recursively for ``truth.json``. Prints subjects (controls), microbleeds per
MARS category and region, per size class (2-5 mm / 5-10 mm), and calcifications. All figures are
of simulated data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from typing import Iterable

from core import mars


def find_truth_files(dirs: Iterable[str]) -> list[str]:
    out = []
    for d in dirs:
        if os.path.isfile(d) and d.endswith(".json"):
            out.append(d)
            continue
        for root, _dirs, files in os.walk(d):
            if "truth.json" in files:
                out.append(os.path.join(root, "truth.json"))
    return sorted(out)


def cohort_stats(truth_files: Iterable[str]) -> dict:
    """Aggregate counts over ``truth.json`` files."""
    n_sub = n_ctrl = 0
    per_subject: list[int] = []
    by_cat: Counter = Counter()
    by_region: Counter = Counter()
    by_size: Counter = Counter()
    by_side: Counter = Counter()
    calc = 0
    calc_by_region: Counter = Counter()
    diam: list[float] = []
    for path in truth_files:
        with open(path) as fh:
            t = json.load(fh)
        n_sub += 1
        n_ctrl += bool(t.get("control"))
        n = 0
        for l in t.get("lesions", []):
            if l["kind"] == "cmb":
                n += 1
                by_cat[l["mars_category"]] += 1
                by_region[l["mars_region"]] += 1
                by_side[l["side"]] += 1
                by_size["2-5mm" if l["diameter_mm"] < 5.0 else "5-10mm"] += 1
                diam.append(float(l["diameter_mm"]))
            elif l["kind"] == "calcification":
                calc += 1
                calc_by_region[l["mars_region"]] += 1
        per_subject.append(n)
    total = sum(per_subject)
    return {
        "subjects": n_sub,
        "controls": n_ctrl,
        "cmb_total": total,
        "cmb_per_subject_mean": (total / n_sub) if n_sub else 0.0,
        "cmb_per_subject_max": max(per_subject) if per_subject else 0,
        "cmb_by_category": {c: by_cat.get(c, 0) for c in mars.CATEGORIES},
        "cmb_by_region": {r.key: by_region.get(r.key, 0) for r in mars.MARS_REGIONS},
        "cmb_by_size": {k: by_size.get(k, 0) for k in ("2-5mm", "5-10mm")},
        "cmb_by_side": dict(by_side),
        "cmb_diameter_mean_mm": (sum(diam) / len(diam)) if diam else 0.0,
        "calcifications": calc,
        "calcification_by_region": dict(calc_by_region),
    }


def format_stats(stats: dict) -> str:
    lines = [
        f"simulated cohort: {stats['subjects']} subjects ({stats['controls']} controls)",
        f"microbleeds: {stats['cmb_total']} (mean {stats['cmb_per_subject_mean']:.2f}/subject, "
        f"max {stats['cmb_per_subject_max']}), mean diameter {stats['cmb_diameter_mean_mm']:.2f} mm",
        "  by category: " + ", ".join(f"{k} {v}" for k, v in stats["cmb_by_category"].items()),
        "  by size: " + ", ".join(f"{k} {v}" for k, v in stats["cmb_by_size"].items()),
        "  by side: " + ", ".join(f"{k} {v}" for k, v in sorted(stats["cmb_by_side"].items())),
        "  by MARS region:",
    ]
    for r in mars.MARS_REGIONS:
        lines.append(f"    {r.display_name:<40s} {r.category:<15s} {stats['cmb_by_region'][r.key]}")
    lines.append(f"calcifications: {stats['calcifications']} "
                 + ", ".join(f"{k or 'none'} {v}" for k, v in sorted(stats["calcification_by_region"].items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.cohort_stats", description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", help="folders holding truth.json files (searched recursively)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    files = find_truth_files(args.dirs)
    if not files:
        print("no truth.json found under " + " ".join(args.dirs), file=sys.stderr)
        return 1
    stats = cohort_stats(files)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
