"""End-to-end benchmark: a simulated study pushed with storescu to the node, which runs the real
app (``python -m app -i {input} -o {output}``) and sends the app's DICOM results to Orthanc.

    python -m bench.end_to_end [--voxel-mm 3 3 3] [--quiet 2] [--out bench/results/end_to_end.json]
        [--baseline DIR]   # also run an older checkout (e.g. a git worktree) on the same study, in one run
        [--early-start on|off|both]   # the node's early_start (both: off, then on, same study)

Reported, in seconds, from the last instance received (the study's ``last_received`` in the
node's queue): to the job being queued (the quiet period ``study_quiet_seconds``, or about
``early_start_guard_seconds`` when the node's early start found every GRE series complete: the
report's ``start_reason`` says which), to the app starting, to the job ``done`` (app finished,
results recorded), and, if the app wrote DICOM files, to the last of them being stored in
Orthanc (``delivered``), with what arrived (SOP class, series description, modality). An app
that writes no DICOM ends at ``done`` with ``n_results`` 0, and the report says so.

:func:`run_end_to_end` is also what ``tests/integration/test_node_end_to_end.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.common import write_result
from bench.ingest import dcmtk_env, free_port, simulate_study, start_orthanc, stop, wait_echo
from deploy.node.harness import wait_for
from deploy.node.queue import Queue

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
NODE_AET, SCU_AET = "CMB_NODE", "BENCH_SCU"
SR_3D, SEG = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.66.4"


def _http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def start_node(root: Path, orthanc_port: int, quiet: float, repo: Path = REPO,
               early_start: bool | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """The node of ``repo`` with the real app (its default command, so its default prestart) and
    Orthanc as destination; returns (process, DICOM port). ``early_start`` None leaves the key out
    (the node's default; an older checkout does not know it)."""
    port = free_port()
    cfg = {"ae_title": NODE_AET, "port": port, "bind": "127.0.0.1", "spool": str(root / "spool"),
           "allowed_calling_aets": [SCU_AET], "study_quiet_seconds": quiet, "min_free_mb": 1,
           "workers": 1, "poll_seconds": 0.1,
           "destinations": [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}],
           "retry": {"max_attempts": 5, "backoff_base_seconds": 0.5, "backoff_max_seconds": 2},
           "app": {"timeout_seconds": 600, "max_attempts": 1, "require_dicom_results": False}}
    if early_start is not None:
        cfg["early_start"] = early_start
    root.mkdir(parents=True, exist_ok=True)
    (root / "node.yaml").write_text(yaml.safe_dump(cfg))
    with open(root / "node.log", "wb") as log:
        proc = subprocess.Popen([PY, "-m", "deploy.node", "--config", str(root / "node.yaml")],
                                cwd=repo, stdout=log, stderr=log)
    wait_echo(port, NODE_AET)
    return proc, port


def run_end_to_end(study_dir: Path, work: Path, quiet: float = 2.0,
                   timeout: float = 600.0, repo: Path = REPO,
                   early_start: bool | None = None) -> dict[str, Any]:
    """Push ``study_dir`` through node -> app -> Orthanc and time each stage (see module doc)."""
    orthanc, o_dicom, o_http = start_orthanc(work / "orthanc")
    node = None
    try:
        node, port = start_node(work / "node", o_dicom, quiet, repo, early_start)
        n_files = sum(1 for p in study_dir.rglob("*") if p.is_file())
        t0 = time.time()
        push = subprocess.run(["storescu", "-aet", SCU_AET, "-aec", NODE_AET, "+sd", "+r",
                               "127.0.0.1", str(port), str(study_dir)], env=dcmtk_env(),
                              capture_output=True, text=True, timeout=timeout)
        if push.returncode != 0:
            raise RuntimeError(f"storescu failed: {push.stderr[-1000:]}")
        push_seconds = time.time() - t0
        queue = Queue(work / "node" / "spool" / "queue.sqlite", readonly=True)

        def finished() -> dict[str, Any] | None:
            jobs = queue.snapshot()["jobs"]
            if jobs and jobs[-1]["state"] in ("done", "delivered", "failed", "skipped"):
                return jobs[-1]
            return None

        job = wait_for(finished, timeout, "the job to finish", interval=0.05)
        snap = queue.snapshot()
        study = snap["studies"][0]
        if job["state"] not in ("done", "delivered"):
            log = (work / "node" / "node.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"job ended {job['state']}: {job['reason']}\n{log}")
        last = float(study["last_received"])
        report: dict[str, Any] = {
            "instances_sent": n_files, "instances_stored": int(study["n_instances"]),
            "push_seconds": round(push_seconds, 2), "study_quiet_seconds": quiet,
            "early_start": early_start, "start_reason": job.get("start_reason"),
            "job_state": job["state"], "trigger": job["trigger"], "n_results": job["n_results"],
            "seconds_last_instance_to_app_start": round(float(job["started_at"]) - last, 2),
            "app_seconds": round(float(job["finished_at"]) - float(job["started_at"]), 2),
            "seconds_last_instance_to_done": round(float(job["finished_at"]) - last, 2),
        }
        if job["n_results"]:
            def delivered() -> dict[str, Any] | None:
                s = queue.snapshot()
                states = [d["state"] for d in s["deliveries"]]
                if states and all(st == "delivered" for st in states):
                    return s
                if "failed" in states:
                    raise RuntimeError(f"a delivery gave up: {s['deliveries']}")
                return None
            s = wait_for(delivered, timeout, "the results to reach Orthanc", interval=0.05)
            t_stored = max(float(d["delivered_at"]) for d in s["deliveries"])
            sr_seg = [float(d["delivered_at"]) for d in s["deliveries"]
                      if d["sop_class_uid"] in (SR_3D, SEG)]
            if sr_seg:
                report["seconds_last_instance_to_sr_and_seg_in_orthanc"] = round(max(sr_seg) - last, 2)

            def job_delivered() -> dict[str, Any] | None:
                jobs = queue.snapshot()["jobs"]
                return jobs[-1] if jobs and jobs[-1]["state"] == "delivered" else None
            report["job_state"] = wait_for(job_delivered, timeout, "the job to be marked delivered",
                                        interval=0.05)["state"]
            arrived = []
            for iid in _http_json(f"http://127.0.0.1:{o_http}/instances"):
                tags = _http_json(f"http://127.0.0.1:{o_http}/instances/{iid}/simplified-tags")
                arrived.append({k: tags.get(k) for k in ("SOPClassUID", "Modality",
                                                         "SeriesDescription", "SOPInstanceUID",
                                                         "StudyInstanceUID")})
            report.update({
                "seconds_last_instance_to_results_in_orthanc": round(t_stored - last, 2),
                "results_in_orthanc": arrived,
                "measured_to": "results stored in Orthanc",
            })
        else:
            report.update({"results_in_orthanc": [],
                           "measured_to": "job 'done' (the app wrote no DICOM result yet)"})
        report.update(app_steps(work / "node" / "spool" / "jobs"))
        report["app_output_files"] = sorted(
            str(p.relative_to(work / "node" / "spool" / "jobs"))
            for p in (work / "node" / "spool" / "jobs").rglob("output/*") if p.is_file())
        queue.close()
        return report
    finally:
        if node is not None:
            stop(node)
        stop(orthanc)


STEP_LINE = re.compile(r"^\[\d+/\d+\] (.+?)\s+([\d.]+) s$")


def app_steps(jobs: Path) -> dict[str, Any]:
    """The app's own step seconds (its ``[n/N] step  x s`` progress lines in the job's app.log) and
    the QSM / detection sub-steps of its summary.json, for the last attempt of the last job."""
    out: dict[str, Any] = {}
    logs = sorted(jobs.glob("*/attempt-*/app.log"))
    if logs:
        steps = {}
        for line in logs[-1].read_text(errors="replace").splitlines():
            m = STEP_LINE.match(line.strip())
            if m:
                steps[m.group(1).strip()] = float(m.group(2))
        out["app_steps_s"] = steps
        summary = logs[-1].parent / "output" / "summary.json"
        if summary.is_file():
            d = json.loads(summary.read_text())
            out["qsm_steps_s"] = d.get("qsm", {}).get("seconds", {})
            out["detection_steps_s"] = d.get("detection", {}).get("seconds", {})
    return out


def _commit(repo: Path) -> str:
    """Short commit id of the checkout at ``repo`` ('' if it is not a git checkout)."""
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, help="folder of DICOM files (default: simulate one)")
    ap.add_argument("--voxel-mm", type=float, nargs=3, default=(3.0, 3.0, 3.0))
    ap.add_argument("--quiet", type=float, default=2.0, help="node study_quiet_seconds")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "end_to_end.json")
    ap.add_argument("--baseline", type=Path, help="an older checkout to run on the same study first "
                    "(e.g. git worktree add /tmp/base <commit>); the report then holds both")
    ap.add_argument("--early-start", choices=("on", "off", "both"),
                    help="the node's early_start (default: the node's default); both: off first, "
                    "then on, on the same study, reported side by side")
    args = ap.parse_args(argv)
    if args.baseline and args.early_start == "both":
        ap.error("--baseline and --early-start both: choose one comparison")
    with tempfile.TemporaryDirectory(prefix="cmb-e2e-") as tmp:
        work = Path(tmp)
        study = args.study or simulate_study(work / "sim", tuple(args.voxel_mm))
        if args.early_start == "both":
            off = run_end_to_end(study, work / "off", quiet=args.quiet, early_start=False)
            on = run_end_to_end(study, work / "on", quiet=args.quiet, early_start=True)
            report = {"early_start_off": off, "early_start_on": on, "code": _commit(REPO),
                      "order": "early_start off first, then on, on the same simulated study",
                      # what early start changes: the wait before the app starts; the app's own
                      # time varies with the machine's load and is not part of the difference
                      "saved_seconds_last_instance_to_app_start": round(
                          off["seconds_last_instance_to_app_start"]
                          - on["seconds_last_instance_to_app_start"], 2),
                      "saved_seconds_last_instance_to_done": round(
                          off["seconds_last_instance_to_done"] - on["seconds_last_instance_to_done"], 2)}
        else:
            early = None if args.early_start is None else args.early_start == "on"
            if args.baseline:
                base = run_end_to_end(study, work / "baseline", quiet=args.quiet,
                                      repo=args.baseline.resolve())
                base["code"] = _commit(args.baseline)
            report = run_end_to_end(study, work / "current", quiet=args.quiet, early_start=early)
            report["code"] = _commit(REPO)
            if args.baseline:
                report = {"current": report, "baseline": base,
                          "order": "baseline first, then current, on the same simulated study"}
    report = {"simulated": args.study is None,
              "study": (f"training.simulate --subjects 1 --seed 1 --voxel-mm "
                        f"{' '.join(str(v) for v in args.voxel_mm)}" if args.study is None
                        else str(args.study)),
              **report}
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
