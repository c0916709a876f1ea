"""Score a detector's outputs against reference lesions, stage by stage, from files.

    python -m training.evaluate --predictions DIR --truth DIR
        [--out bench/results/detection.json] [--froc-png PATH] [--threshold P]

Inputs, one folder per subject (subject id = folder name)::

    PRED/<subject>/findings.json   core.findings.StudyFindings.save(): the final microbleeds + mimics
    PRED/<subject>/stages.json     optional: {"stage1": [{"centre_lps_mm": [x, y, z], "probability": p}, ...],
                                              "conv": [...], "vnet": [...], "resnet": [...], ...}
    TRUTH/<subject>/truth/truth.json   the simulator's layout (training.simulate), or
    TRUTH/<subject>/truth.json         (training.realdata writes the former for a hospital cohort)

Each stage list holds the candidates that stage *passes on* (every entry counts as a positive);
probabilities, where given, give that stage's FROC. The final findings are scored with
``--threshold`` (default 0: every reported microbleed) and their FROC runs over all thresholds.

Printed: the seed paper's Table 2 (stage I candidates: TP, sensitivity, TP + FP per stage) and
Table 3 (classifiers and the final output: TP, FN, FP, sensitivity, PPV, FP per subject; TN is not
reported because it needs the classifier's rejected candidates), then sensitivity per size class
and MARS region, controls and calcifications. The JSON has ``"simulated": true`` only when every
truth file says it came from the simulator: figures on simulated data must be labelled as such.
A truth subject without predictions is scored as having no detections and listed under
``"missing_predictions"``.

Matching rule and metric definitions: :mod:`training.metrics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from training import metrics as M

CANDIDATE_STAGES = (
    "stage1", "frst", "conv", "candidates", "handcrafted", "volume", "length", "fractional_anisotropy",
)
"""Stage names reported in the Table 2 style (candidate generation); other stages go to Table 3."""

FINAL = "final"
THRESHOLDS = "thresholds"
"""Optional key of stages.json: ``{stage: operating threshold}``. A stage listed there holds every
candidate with its probability; its table row is scored at that threshold and its FROC over all."""


def merge_thresholds(per_subject: dict[str, dict], pred_dir: Path) -> dict[str, float]:
    """One ``{stage: threshold}`` from the subjects' stages.json ``thresholds`` (they must agree)."""
    out: dict[str, float] = {}
    for d in per_subject.values():
        for k, v in d.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                continue  # e.g. the decision rule's name
            if k in out and abs(out[k] - float(v)) > 1e-9:
                raise ConfigError(f"subjects in {pred_dir} were predicted with different {k} thresholds "
                                  f"({out[k]} and {v}): one model per evaluation")
            out[k] = float(v)
    return out


def find_truth_file(truth_dir: Path, subject: str) -> Path | None:
    """``<subject>/truth/truth.json`` (simulator layout) or ``<subject>/truth.json``."""
    for p in (truth_dir / subject / "truth" / "truth.json", truth_dir / subject / "truth.json"):
        if p.is_file():
            return p
    return None


def load_truth(truth_dir: Path) -> dict[str, dict]:
    """All subjects' truth records, keyed by subject folder name."""
    if not truth_dir.is_dir():
        raise ConfigError(f"truth folder {truth_dir} does not exist")
    out = {}
    for sub in sorted(p.name for p in truth_dir.iterdir() if p.is_dir()):
        f = find_truth_file(truth_dir, sub)
        if f is not None:
            try:
                out[sub] = json.loads(f.read_text())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"truth file {f} is not valid JSON ({exc})") from exc
    if not out:
        raise ConfigError(f"no <subject>/truth/truth.json or <subject>/truth.json under {truth_dir}")
    return out


def load_predictions(pred_dir: Path, subject: str) -> dict[str, list[dict]] | None:
    """Per-stage detection lists of one subject (``final`` from findings.json), or None if absent;
    stages.json's ``thresholds`` object, when present, is kept under ``THRESHOLDS``."""
    folder = pred_dir / subject
    fj, sj = folder / "findings.json", folder / "stages.json"
    if not fj.is_file() and not sj.is_file():
        return None
    stages: dict[str, list[dict]] = {}
    if fj.is_file():
        try:
            d = json.loads(fj.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"findings file {fj} is not valid JSON ({exc})") from exc
        stages[FINAL] = list(d.get("microbleeds", [])) + list(d.get("mimics", []))
    if sj.is_file():
        try:
            d = json.loads(sj.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"stages file {sj} is not valid JSON ({exc})") from exc
        if not isinstance(d, dict):
            raise ConfigError(f"stages file {sj} must map stage names to lists of candidates")
        for name, items in d.items():
            if name == THRESHOLDS:
                if not isinstance(items, dict):
                    raise ConfigError(f"stages file {sj}: {THRESHOLDS!r} must map stage names to thresholds")
                stages[THRESHOLDS] = items
                continue
            if name == FINAL:
                raise ConfigError(f"stages file {sj} may not use the reserved stage name {FINAL!r}")
            stages[name] = [dict(x, kind=x.get("kind", "cmb")) for x in items]
    return stages


def evaluate(pred_dir: Path, truth_dir: Path, *, threshold: float = 0.0) -> dict:
    """Score every stage over the cohort; returns the JSON-ready report."""
    truth = load_truth(truth_dir)
    if not pred_dir.is_dir():
        raise ConfigError(f"predictions folder {pred_dir} does not exist")
    preds = {s: load_predictions(pred_dir, s) for s in truth}
    stage_thr = merge_thresholds({s: p.pop(THRESHOLDS) for s, p in preds.items() if p and THRESHOLDS in p},
                                 pred_dir)
    missing = sorted(s for s, p in preds.items() if p is None)
    extra = sorted(
        p.name for p in pred_dir.iterdir()
        if p.is_dir() and p.name not in truth and (p / "findings.json").exists()
    )
    stage_names = sorted({n for p in preds.values() if p for n in p}, key=lambda n: (n == FINAL, n))
    stages: dict[str, Any] = {}
    def score(name: str, thr: float, kind: str = "cmb") -> list[M.SubjectResult]:
        return [M.evaluate_subject(sub, (preds[sub] or {}).get(name, []), t.get("lesions", []),
                                   control=bool(t.get("control", False)), threshold=thr, kind=kind)
                for sub, t in truth.items()]

    for name in stage_names:
        thr = threshold if name == FINAL else stage_thr.get(name, 0.0)
        results = score(name, thr)
        s = M.summarise(results, froc_results=score(name, 0.0) if thr > 0 else None)
        s["table"] = "2" if name in CANDIDATE_STAGES else "3"
        if name != FINAL and name in stage_thr:
            s["operating_threshold"] = stage_thr[name]
        s["tp_plus_fp"] = s["counts"]["tp"] + s["counts"]["fp"]
        if name == FINAL:
            s["missed"] = M.missed_lesions(results)
        stages[name] = s
    calc_detection = None
    if FINAL in stage_names:
        # findings labelled calcification against reference calcifications (mimic recognition)
        calc_detection = M.cohort_counts(score(FINAL, 0.0, kind="calcification")).to_json()
    simulated = [bool(t.get("simulated", False)) for t in truth.values()]
    n_cmb = sum(1 for t in truth.values() for l in t.get("lesions", []) if l.get("kind", "cmb") == "cmb")
    return {
        "simulated": all(simulated),
        "n_simulated_subjects": sum(simulated),
        "n_subjects": len(truth),
        "n_controls": sum(1 for t in truth.values() if t.get("control", False)),
        "n_reference_cmb": n_cmb,
        "hit_rule": f"centre within max({M.MIN_HIT_RADIUS_MM} mm, radius + {M.HIT_MARGIN_MM} mm), one to one",
        "final_threshold": threshold,
        "missing_predictions": missing,
        "predictions_without_truth": extra,
        "stages": stages,
        "calcification_detection": calc_detection,
    }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def format_tables(report: dict) -> str:
    """The paper-style tables as plain text."""
    st = report["stages"]
    tag = "SIMULATED data" if report["simulated"] else "data not (all) simulated"
    lines = [f"Detection on {report['n_subjects']} subjects ({report['n_controls']} controls), "
             f"{report['n_reference_cmb']} reference microbleeds; {tag}", ""]
    t2 = [n for n in st if st[n]["table"] == "2"]
    if t2:
        lines.append("Table 2 style: stage I candidates")
        lines.append(f"{'stage':<24}{'TP':>7}{'sensitivity':>13}{'TP+FP':>9}")
        lines.append(f"{'total (reference)':<24}{report['n_reference_cmb']:>7}{'100%':>13}{'':>9}")
        for n in t2:
            c = st[n]["counts"]
            lines.append(f"{n:<24}{c['tp']:>7}{_pct(c['sensitivity']):>13}{st[n]['tp_plus_fp']:>9}")
        lines.append("")
    t3 = [n for n in st if st[n]["table"] == "3"]
    if t3:
        lines.append("Table 3 style: stage II classifiers and final output")
        lines.append(f"{'stage':<24}{'TP':>6}{'FN':>6}{'FP':>7}{'sensitivity':>13}{'PPV':>8}"
                     f"{'FP/subj':>9}{'F1':>7}")
        for n in t3:
            c = st[n]["counts"]
            lines.append(f"{n:<24}{c['tp']:>6}{c['fn']:>6}{c['fp']:>7}{_pct(c['sensitivity']):>13}"
                         f"{_pct(c['ppv']):>8}{_num(c['fp_per_subject']):>9}{_num(c['f1']):>7}")
        lines.append("")
    main = FINAL if FINAL in st else (t3[-1] if t3 else (t2[-1] if t2 else None))
    if main is not None:
        s = st[main]
        lines.append(f"{main}: sensitivity by size class")
        for g, v in s["by_size"].items():
            lines.append(f"  {g:<28}{v['tp']:>4}/{v['n']:<4}{_pct(v['sensitivity']):>8}")
        lines.append(f"{main}: sensitivity by MARS region")
        for g, v in s["by_mars_region"].items():
            lines.append(f"  {g:<28}{v['tp']:>4}/{v['n']:<4}{_pct(v['sensitivity']):>8}")
        c, k = s["controls"], s["calcifications"]
        if c["n_controls"]:
            lines.append(f"{main}: controls without any FP {c['n_without_fp']}/{c['n_controls']} "
                         f"({_pct(c['fraction_without_fp'])}), FP per control {_num(c['fp_per_control'])}")
        lines.append(f"{main}: calcifications reported as microbleeds "
                     f"{k['reported_as_cmb']}/{k['n_calcifications']}")
        ops = ", ".join(f"{x} FP/subj: {_pct(v)}" for x, v in s["froc"]["sensitivity_at_fp"].items())
        lines.append(f"{main}: FROC sensitivity at {ops}")
    cd = report.get("calcification_detection")
    if cd and cd["tp"] + cd["fn"] + cd["fp"]:
        lines.append(f"calcifications labelled as such: TP {cd['tp']}, FN {cd['fn']}, FP {cd['fp']} "
                     f"(sensitivity {_pct(cd['sensitivity'])}, PPV {_pct(cd['ppv'])})")
    if report["missing_predictions"]:
        lines.append("subjects without predictions (scored as no detections): "
                     + ", ".join(report["missing_predictions"]))
    return "\n".join(lines)


def plot_froc(report: dict, path: Path) -> Path:
    """FROC curves of every stage that has probabilities, as a PNG. A stage with a single operating
    point (no probabilities, e.g. the hand-crafted baseline) is one marker, not a curve; the
    product's final output is drawn last, in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    names = sorted(report["stages"], key=lambda n: (n == FINAL, n))
    for name in names:
        pts = report["stages"][name]["froc"]["points"]
        if not pts:
            continue
        style = {"color": "black", "linewidth": 2.0, "zorder": 5} if name == FINAL else {}
        if len(pts) == 1:
            ax.plot([pts[0]["fp_per_subject"]], [pts[0]["sensitivity"]], marker="D" if name == FINAL else "s",
                    linestyle="none", label=name, **style)
            continue
        x = [0.0] + [p["fp_per_subject"] for p in pts]
        y = [0.0] + [p["sensitivity"] for p in pts]
        ax.step(x, y, where="post", label=name, marker="." if len(pts) < 50 else None, **style)
        if name == FINAL:  # the operating point: every reported microbleed
            ax.plot([x[-1]], [y[-1]], marker="D", color="black", linestyle="none", zorder=6)
    ax.set_xlabel("mean false positives per subject")
    ax.set_ylabel("sensitivity")
    ax.set_ylim(0, 1.02)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("FROC" + (" (simulated data)" if report["simulated"] else ""))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--predictions", required=True, type=Path,
                    help="folder of <subject>/findings.json (+ stages.json)")
    ap.add_argument("--truth", required=True, type=Path, help="folder of <subject>/truth/truth.json")
    ap.add_argument("--out", type=Path, default=Path("bench/results/detection.json"))
    ap.add_argument("--froc-png", type=Path, default=None)
    ap.add_argument("--threshold", type=float, default=0.0,
                    help="probability threshold for the final findings")
    a = ap.parse_args(argv)
    try:
        report = evaluate(a.predictions, a.truth, threshold=a.threshold)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_tables(report))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {a.out}")
    if a.froc_png is not None:
        print(f"wrote {plot_froc(report, a.froc_png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
