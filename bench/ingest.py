"""Ingest benchmark: the same simulated study pushed with DCMTK storescu, in one run, to DCMTK
storescp, to a do-nothing pynetdicom SCP, to the node with ``ingest_journal: false`` and to the
node with ``ingest_journal: true`` (and to Orthanc with ``--with-orthanc``), on loopback, with the
fsync latency percentiles of the same disk. Reports instances per second and each receiver's rate
as a fraction of storescp's.

    python -m bench.ingest [--study DIR] [--repeats N] [--associations 1 4] [--with-orthanc]
                           [--fsync-n 100] [--out bench/results/ingest.json]
    python -m bench.ingest --rederive bench/results/ingest.json   # argument block only

Without ``--study`` it simulates one subject (``training.simulate --voxel-mm 2 2 1.5``: 4 echoes,
magnitude + phase, 936 classic MR files of ~25 KiB). Each ``--associations`` value is one round:
N storescu processes in parallel, each sending every N-th file (1 = a scanner's single
association; several = what lets the node's journal share one fdatasync between associations).
In a round, each repeat pushes to every receiver once, in an order rotated between repeats, so
load changes on this shared machine hit every receiver alike; the best and the median of the
repeats are reported, and every run's seconds. ``TCP_NODELAY=1`` is set for the DCMTK tools on
both ends (without it DCMTK's small writes meet Nagle's algorithm and every tool looks slow).

What each receiver does with an instance before it answers Success:

* ``storescp``: ``storescp -od DIR`` writes the file, no fsync (the reference, DCMTK);
* ``null_pynetdicom``: ``bench/null_scp.py``, pynetdicom with the node's contexts, PDU size and
  polling tuning, answering 0x0000 without decoding or writing: the ceiling of any pynetdicom
  receiver on this machine;
* ``node_fsync``: the node, ``ingest_journal: false``: decode, temp file + fsync, rename, folder
  fsync (shared between concurrent associations), queue row;
* ``node_journal``: the node, ``ingest_journal: true``: decode, one journal record appended and
  fdatasynced (one fdatasync for every association writing at that moment), file written and
  renamed without fsync (fsynced by the checkpoint later), queue row. The node's ``node_stopped``
  log line gives records and fdatasyncs, reported as instances per fdatasync;
* ``orthanc``: Orthanc's default configuration (SQLite index, files on disk).

``fsync``: ``bench.fsync.measure`` on the same disk, in the same run, before the pushes (the
per-instance durable-write steps, ms percentiles). ``argument`` turns the figures into the time
budget per instance that half of storescp's rate leaves, against what the null handler alone
spends and what the fsync path costs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from bench.common import write_result
from bench.fsync import measure as measure_fsync

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SCU_AET = "BENCH_SCU"
#: storescu proposes a 128 KiB maximum PDU (DCMTK's default is 16 KiB); every receiver here
#: advertises a larger or unlimited one, so this sets the PDU size the SCP receives.
SCU_OPTS = ("-pdu", "131072")
NODE_FAST_POLLING = True


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dcmtk_env() -> dict[str, str]:
    return dict(os.environ, TCP_NODELAY="1")


def simulate_study(out: Path, voxel_mm: tuple[float, float, float] = (2.0, 2.0, 1.5)) -> Path:
    """Simulate one subject with the project's simulator; returns its DICOM folder."""
    subprocess.run([PY, "-m", "training.simulate", "--out", str(out), "--subjects", "1",
                    "--seed", "1", "--voxel-mm", *(str(v) for v in voxel_mm)],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out / "sub-000" / "dicom"


def wait_echo(port: int, aet: str, timeout: float = 30.0) -> None:
    """Wait until a C-ECHO to ``aet`` on ``port`` succeeds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["echoscu", "-aet", SCU_AET, "-aec", aet, "127.0.0.1", str(port)],
                           env=dcmtk_env(), capture_output=True)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{aet} on port {port} did not answer C-ECHO within {timeout} s")


ASSOCIATIONS = 1


def push(files_dir: Path, port: int, aet: str) -> tuple[float, str]:
    """storescu the whole folder: one association, or ``ASSOCIATIONS`` storescu processes in
    parallel, each with an interleaved share of the files. Returns (seconds, stderr tail)."""
    t0 = time.perf_counter()
    if ASSOCIATIONS == 1:
        cmds = [["storescu", *SCU_OPTS, "-aet", SCU_AET, "-aec", aet, "+sd", "+r", "127.0.0.1", str(port),
                 str(files_dir)]]
    else:
        files = sorted(str(p) for p in files_dir.rglob("*") if p.is_file())
        cmds = [["storescu", *SCU_OPTS, "-aet", SCU_AET, "-aec", aet, "127.0.0.1", str(port),
                 *files[i::ASSOCIATIONS]] for i in range(ASSOCIATIONS)]
    procs = [subprocess.Popen(c, env=dcmtk_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    errs = [(p.wait(), p.stderr.read() if p.stderr else "") for p in procs]
    dt = time.perf_counter() - t0
    for rc, err in errs:
        if rc != 0:
            raise RuntimeError(f"storescu to {aet} failed ({rc}): {err[-1000:]}")
    return dt, errs[0][1][-500:]


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _node_events(log: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("event") == name:
                out.append(rec)
    return out


def run_node(files_dir: Path, root: Path, journal: bool = True) -> tuple[float, int, dict[str, Any]]:
    """Push to the node (``ingest_journal`` = ``journal``); (seconds, files stored, extra)."""
    port = free_port()
    spool = root / "spool"
    cfg = {"ae_title": "CMB_NODE", "port": port, "bind": "127.0.0.1", "spool": str(spool),
           "allowed_calling_aets": [SCU_AET], "study_quiet_seconds": 3600, "min_free_mb": 1,
           "workers": 1, "poll_seconds": 0.5, "ingest_journal": journal,
           "association": {"fast_polling": NODE_FAST_POLLING}}
    (root / "node.yaml").write_text(yaml.safe_dump(cfg))
    with open(root / "node.log", "wb") as log:
        proc = subprocess.Popen([PY, "-m", "deploy.node", "--config", str(root / "node.yaml")],
                                cwd=REPO, stdout=log, stderr=log)
    dt = _push_then_stop(proc, files_dir, port, "CMB_NODE")
    extra: dict[str, Any] = {}
    stopped = _node_events(root / "node.log", "node_stopped")
    if journal:
        if not stopped or "journal_syncs" not in stopped[-1]:
            raise RuntimeError(f"the node did not log its journal figures: {root / 'node.log'}")
        rec, syncs = stopped[-1]["journal_records"], stopped[-1]["journal_syncs"]
        extra = {"journal_records": rec, "journal_fdatasyncs": syncs,
                 "instances_per_fdatasync": round(rec / max(syncs, 1), 2)}
    return dt, len(list((spool / "instances").glob("*/*/*.dcm"))), extra


def _push_then_stop(proc: subprocess.Popen, files_dir: Path, port: int, aet: str) -> float:
    """Wait until the receiver ``proc`` answers C-ECHO as ``aet``, push ``files_dir`` to it, stop
    it (also on failure); the push's seconds."""
    try:
        wait_echo(port, aet)
        dt, _ = push(files_dir, port, aet)
    finally:
        stop(proc)
    return dt


def run_storescp(files_dir: Path, root: Path) -> tuple[float, int, dict[str, Any]]:
    port = free_port()
    out = root / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dt = _push_then_stop(proc, files_dir, port, "STORESCP")
    return dt, sum(1 for p in out.iterdir() if p.is_file()), {}


def run_null(files_dir: Path, root: Path) -> tuple[float, int | None, dict[str, Any]]:
    """Push to the do-nothing pynetdicom SCP (bench/null_scp.py); it stores nothing, so there is
    no count to check (storescu's exit status says every C-STORE got Success)."""
    port = free_port()
    with open(root / "null_scp.log", "wb") as log:
        proc = subprocess.Popen([PY, "-m", "bench.null_scp", "--port", str(port), "--fast-polling",
                                 "true" if NODE_FAST_POLLING else "false"],
                                cwd=REPO, stdout=log, stderr=log)
    dt = _push_then_stop(proc, files_dir, port, "NULL_SCP")
    return dt, None, {}


def start_orthanc(root: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    """Orthanc 1.10 on loopback with a temp config; returns (process, DICOM port, HTTP port)."""
    dicom_port, http_port = free_port(), free_port()
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"Name": "bench-orthanc", "DicomAet": "ORTHANC", "DicomPort": dicom_port,
           "HttpPort": http_port, "StorageDirectory": str(root / "storage"),
           "IndexDirectory": str(root / "index"), "RemoteAccessAllowed": False,
           "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [],
           "DicomModalities": {}, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True}
    (root / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(["Orthanc", str(root / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_echo(dicom_port, "ORTHANC")
    except BaseException:
        stop(proc)
        raise
    return proc, dicom_port, http_port


def run_orthanc(files_dir: Path, root: Path) -> tuple[float, int, dict[str, Any]]:
    proc, dicom_port, http_port = start_orthanc(root / "orthanc")
    try:
        dt, _ = push(files_dir, dicom_port, "ORTHANC")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=10) as r:
            n = int(json.loads(r.read())["CountInstances"])
    finally:
        stop(proc)
    return dt, n, {}


RUNNERS: dict[str, Callable[[Path, Path], tuple[float, int | None, dict[str, Any]]]] = {
    "storescp": run_storescp,
    "null_pynetdicom": run_null,
    "node_fsync": lambda d, r: run_node(d, r, journal=False),
    "node_journal": lambda d, r: run_node(d, r, journal=True),
    "orthanc": run_orthanc,
}
NOTES = {
    "storescp": "storescp -od DIR: writes the file, no fsync",
    "null_pynetdicom": "bench/null_scp.py: pynetdicom, node's contexts / PDU / polling tuning, "
                       "answers 0x0000 and does nothing else (the ceiling of a pynetdicom receiver)",
    "node_fsync": "node, ingest_journal false: file fsync + rename + folder fsync (folder fsyncs "
                  "shared between concurrent associations) + queue row, then Success",
    "node_journal": "node, ingest_journal true: journal record + fdatasync (one per group of "
                    "concurrent associations) + file renamed unsynced (checkpoint fsyncs it "
                    "later, replay at start-up restores it) + queue row, then Success",
    "orthanc": "Orthanc default config (SQLite index, files on disk)",
}


def _round(files_dir: Path, tmpdir: Path, n_assoc: int, names: list[str], repeats: int,
           n_files: int) -> dict[str, Any]:
    global ASSOCIATIONS
    ASSOCIATIONS = max(1, n_assoc)
    runs: dict[str, list[float]] = {n: [] for n in names}
    extras: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: spread load drift
        for name in order:
            root = tmpdir / f"{name}-{n_assoc}-{i}"
            root.mkdir()
            dt, received, extra = RUNNERS[name](files_dir, root)
            if received is not None and received != n_files:
                raise RuntimeError(f"{name} stored {received} of {n_files} instances")
            runs[name].append(dt)
            extras[name].append(extra)
            shutil.rmtree(root, ignore_errors=True)
            print(f"{name}, {n_assoc} association(s), run {i + 1}: {n_files} instances "
                  f"in {dt:.2f} s = {n_files / dt:.0f}/s", file=sys.stderr, flush=True)
    results: dict[str, Any] = {}
    for name in names:
        rates = [n_files / t for t in runs[name]]
        results[name] = {"seconds": [round(t, 3) for t in runs[name]],
                         "instances_per_second_best": round(max(rates), 1),
                         "instances_per_second_median": round(statistics.median(rates), 1),
                         "instances_per_second_min": round(min(rates), 1)}
        if any(extras[name]):
            results[name]["per_run"] = extras[name]
    entry: dict[str, Any] = {"receivers": results}
    if "storescp" in results:
        ref = results["storescp"]
        entry["ratio_to_storescp_best"] = {
            k: round(v["instances_per_second_best"] / ref["instances_per_second_best"], 3)
            for k, v in results.items() if k != "storescp"}
        entry["ratio_to_storescp_median"] = {
            k: round(v["instances_per_second_median"] / ref["instances_per_second_median"], 3)
            for k, v in results.items() if k != "storescp"}
    if "null_pynetdicom" in results:
        ceil = results["null_pynetdicom"]["instances_per_second_best"]
        entry["ratio_to_null_pynetdicom_best"] = {
            k: round(results[k]["instances_per_second_best"] / ceil, 3)
            for k in ("node_fsync", "node_journal") if k in results}
    return entry


def _argument(rounds: dict[str, Any], fsync: dict[str, Any], size: int) -> dict[str, Any]:
    """Per-instance time budgets, ms, from the best run of each receiver: what half of
    storescp's rate leaves, what the do-nothing pynetdicom handler alone spends, and (one
    association) about what any durable pynetdicom receiver must spend: the null handler plus
    one journal fdatasync (its median) per instance, since C-STORE on one association is one
    request at a time and nothing can be grouped without acknowledging early. Approximate: the
    best runs and the median flush come from different moments of a noisy machine."""
    res = fsync.get("results", {})
    flush = res.get(f"fdatasync_append_{size}", {}).get("p50_ms")
    out: dict[str, Any] = {}
    for key, entry in rounds.items():
        r = entry["receivers"]
        if "storescp" not in r:
            continue
        n_assoc = int(key.split("_")[0])
        half = r["storescp"]["instances_per_second_best"] / 2.0
        budget = 1000.0 / half
        row: dict[str, Any] = {"half_storescp_instances_per_second": round(half, 1),
                               "budget_ms_per_instance_at_half_storescp": round(budget, 3)}
        for name in ("node_fsync", "node_journal"):
            if name in r:
                row[f"{name}_ms_per_instance"] = round(1000.0 / r[name]["instances_per_second_best"], 3)
        if "null_pynetdicom" in r:
            null_ms = 1000.0 / r["null_pynetdicom"]["instances_per_second_best"]
            row["null_pynetdicom_ms_per_instance"] = round(null_ms, 3)
            row["null_pynetdicom_within_budget"] = null_ms <= budget
            if n_assoc == 1 and flush is not None:
                bound = null_ms + flush  # approximate: best runs and a median flush
                row["null_pynetdicom_plus_median_fdatasync_ms"] = round(bound, 3)
                row["half_storescp_reachable_at_the_median_fdatasync"] = bound <= budget
        out[key] = row
    if f"instance_{size}" in res:
        out["durable_write_p50_ms"] = {
            "fsync_per_instance (file fsync + rename + folder fsync)": res[f"instance_{size}"]["p50_ms"],
            "journal_fdatasync_append (one per group)": res[f"fdatasync_append_{size}"]["p50_ms"]}
        out["durable_write_p99_ms"] = {
            "fsync_per_instance (file fsync + rename + folder fsync)": res[f"instance_{size}"]["p99_ms"],
            "journal_fdatasync_append (one per group)": res[f"fdatasync_append_{size}"]["p99_ms"]}
    return out


def rederive(path: Path) -> dict[str, Any]:
    """Recompute the ``argument`` block of a stored result from its own figures (after a change
    to :func:`_argument`; no push is repeated) and say so in it."""
    report = json.loads(Path(path).read_text())
    size = int(round(report["bytes"] / report["instances"] / 512.0)) * 512
    report["argument"] = _argument(report["rounds"], report.get("fsync", {}), size)
    report["argument_rederived"] = {"from_the_figures_above_by": "python -m bench.ingest "
                                    f"--rederive {path}", "at": time.strftime(
                                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, help="folder of DICOM files (default: simulate one)")
    ap.add_argument("--repeats", type=int, default=3, help="pushes per receiver and round")
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4],
                    help="parallel storescu associations (files split between them); each "
                         "value is one round over all receivers")
    ap.add_argument("--node-fast-polling", choices=["true", "false"], default="true",
                    help="association.fast_polling of the node and the null SCP (default true)")
    ap.add_argument("--only", choices=list(RUNNERS), action="append",
                    help="only these receivers (repeatable); the result is then not written")
    ap.add_argument("--with-orthanc", action="store_true", help="also push to Orthanc (slow)")
    ap.add_argument("--fsync-n", type=int, default=100,
                    help="operations per fsync percentile (0: skip the fsync measurement)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    ap.add_argument("--rederive", type=Path, metavar="RESULT",
                    help="only recompute the 'argument' block of a stored result, push nothing")
    args = ap.parse_args(argv)
    if args.rederive:
        print(json.dumps(rederive(args.rederive)["argument"], indent=2))
        return 0
    global NODE_FAST_POLLING
    NODE_FAST_POLLING = args.node_fast_polling == "true"
    names = args.only or [n for n in RUNNERS if n != "orthanc" or args.with_orthanc]
    tools = ["storescu", "storescp", "echoscu"] + (["Orthanc"] if "orthanc" in names else [])
    for tool in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed (DCMTK, and Orthanc for --with-orthanc)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="cmb-ingest-") as tmp:
        tmpdir = Path(tmp)
        files_dir = args.study or simulate_study(tmpdir / "sim")
        files = [p for p in files_dir.rglob("*") if p.is_file()]
        n_files = len(files)
        size = sum(p.stat().st_size for p in files)
        mean_size = int(round(size / n_files / 512.0)) * 512
        fsync: dict[str, Any] = {}
        if args.fsync_n:
            (tmpdir / "fsync").mkdir()
            t0 = time.time()
            fsync = {"what": "bench.fsync.measure on the disk of the spools, before the pushes, "
                             f"with the study's mean instance size {mean_size} B (ms)",
                     "n": args.fsync_n,
                     "results": measure_fsync(tmpdir / "fsync", args.fsync_n, [mean_size], [4]),
                     "seconds": round(time.time() - t0, 1)}
        rounds: dict[str, Any] = {}
        for n_assoc in args.associations:
            key = f"{max(1, n_assoc)}_association" + ("s" if n_assoc > 1 else "")
            rounds[key] = _round(files_dir, tmpdir, n_assoc, names, args.repeats, n_files)
    report: dict[str, Any] = {
        "simulated": args.study is None,
        "study": ("training.simulate --subjects 1 --seed 1 --voxel-mm 2 2 1.5"
                  if args.study is None else str(args.study)),
        "instances": n_files, "bytes": size,
        "sender": ("storescu -pdu 131072, TCP_NODELAY=1 (storescu and storescp), loopback; "
                   "N associations = N storescu processes in parallel, each sending every N-th "
                   "file; each repeat pushes to every receiver once, order rotated"),
        "repeats": args.repeats,
        "node_config": {"association.maximum_pdu_size": 0,
                        "association.fast_polling": NODE_FAST_POLLING},
        "rounds": rounds,
        "fsync": fsync,
        "argument": _argument(rounds, fsync, mean_size),
        "notes": {n: NOTES[n] for n in names},
    }
    command = ["python", "-m", "bench.ingest", *(argv if argv is not None else sys.argv[1:])]
    write_result(None if args.only else args.out, report, command=command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
