"""Ingest benchmark: the same simulated study pushed with DCMTK storescu to our node, to DCMTK
storescp and to Orthanc, one after the other, on loopback. Reports instances per second and the
node's rate as a fraction of each peer's.

    python -m bench.ingest [--study DIR] [--repeats N] [--associations 1 4]
                           [--out bench/results/ingest.json]

Without ``--study`` it simulates one subject (``training.simulate --voxel-mm 2 2 1.5``: 4 echoes,
magnitude + phase, 936 classic MR files of ~25 KiB). Each ``--associations`` value is one round:
N storescu processes in parallel, each sending every N-th file (1 = a scanner's single
association; several = what lets the node share folder fsyncs). ``TCP_NODELAY=1`` is set for the DCMTK
tools on both ends (without it DCMTK's small writes meet Nagle's algorithm and every tool looks
slow). What each receiver does with an instance differs: the node fsyncs every file, its folder
and the queue record before answering Success; storescp writes the file and does not fsync;
Orthanc writes the file and indexes it in SQLite (its default configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

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


def run_node(files_dir: Path, root: Path) -> tuple[float, int]:
    port = free_port()
    spool = root / "spool"
    cfg = {"ae_title": "CMB_NODE", "port": port, "bind": "127.0.0.1", "spool": str(spool),
           "allowed_calling_aets": [SCU_AET], "study_quiet_seconds": 3600, "min_free_mb": 1,
           "workers": 1, "poll_seconds": 0.5,
           "association": {"fast_polling": NODE_FAST_POLLING}}
    (root / "node.yaml").write_text(yaml.safe_dump(cfg))
    with open(root / "node.log", "wb") as log:
        proc = subprocess.Popen([PY, "-m", "deploy.node", "--config", str(root / "node.yaml")],
                                cwd=REPO, stdout=log, stderr=log)
    try:
        wait_echo(port, "CMB_NODE")
        dt, _ = push(files_dir, port, "CMB_NODE")
    finally:
        stop(proc)
    return dt, len(list((spool / "instances").glob("*/*/*.dcm")))


def run_storescp(files_dir: Path, root: Path) -> tuple[float, int]:
    port = free_port()
    out = root / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_echo(port, "STORESCP")
        dt, _ = push(files_dir, port, "STORESCP")
    finally:
        stop(proc)
    return dt, sum(1 for p in out.iterdir() if p.is_file())


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


def run_orthanc(files_dir: Path, root: Path) -> tuple[float, int]:
    proc, dicom_port, http_port = start_orthanc(root / "orthanc")
    try:
        dt, _ = push(files_dir, dicom_port, "ORTHANC")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/statistics", timeout=10) as r:
            n = int(json.loads(r.read())["CountInstances"])
    finally:
        stop(proc)
    return dt, n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, help="folder of DICOM files (default: simulate one)")
    ap.add_argument("--repeats", type=int, default=2, help="pushes per receiver (best is kept)")
    ap.add_argument("--associations", type=int, nargs="+", default=[1, 4],
                    help="parallel storescu associations (files split between them); each "
                         "value is one round over all receivers")
    ap.add_argument("--node-fast-polling", choices=["true", "false"], default="true",
                    help="the node's association.fast_polling (default true)")
    ap.add_argument("--only", choices=["node", "storescp", "orthanc"], action="append")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = ap.parse_args(argv)
    global NODE_FAST_POLLING
    NODE_FAST_POLLING = args.node_fast_polling == "true"
    global ASSOCIATIONS
    for tool in ("storescu", "storescp", "echoscu", "Orthanc"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed (DCMTK and Orthanc are needed)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="cmb-ingest-") as tmp:
        tmpdir = Path(tmp)
        files_dir = args.study or simulate_study(tmpdir / "sim")
        files = [p for p in files_dir.rglob("*") if p.is_file()]
        n_files = len(files)
        size = sum(p.stat().st_size for p in files)
        runners = {"node": run_node, "storescp": run_storescp, "orthanc": run_orthanc}
        chosen = args.only or list(runners)
        rounds: dict[str, Any] = {}
        for n_assoc in args.associations:
            ASSOCIATIONS = max(1, n_assoc)
            results: dict[str, Any] = {}
            for name in chosen:
                runs = []
                for i in range(args.repeats):
                    root = tmpdir / f"{name}-{n_assoc}-{i}"
                    root.mkdir()
                    dt, received = runners[name](files_dir, root)
                    if received != n_files:
                        raise RuntimeError(f"{name} stored {received} of {n_files} instances")
                    runs.append(dt)
                    print(f"{name}, {n_assoc} association(s), run {i + 1}: {n_files} instances "
                          f"in {dt:.2f} s = {n_files / dt:.0f}/s", file=sys.stderr)
                best = min(runs)
                results[name] = {"seconds": [round(r, 3) for r in runs],
                                 "best_seconds": round(best, 3),
                                 "instances_per_second": round(n_files / best, 1)}
            entry: dict[str, Any] = {"receivers": results}
            if "node" in results:
                node_rate = results["node"]["instances_per_second"]
                entry["ratios"] = {f"node_over_{k}": round(node_rate / v["instances_per_second"], 3)
                                   for k, v in results.items() if k != "node"}
            rounds[f"{ASSOCIATIONS}_association" + ("s" if ASSOCIATIONS > 1 else "")] = entry
    report: dict[str, Any] = {
        "simulated": args.study is None,
        "study": ("training.simulate --subjects 1 --seed 1 --voxel-mm 2 2 1.5"
                  if args.study is None else str(args.study)),
        "instances": n_files, "bytes": size,
        "sender": ("storescu -pdu 131072, TCP_NODELAY=1 (storescu and storescp), loopback; "
                   "N associations = N storescu processes "
                   "in parallel, each sending every N-th file; best of the repeats"),
        "repeats": args.repeats,
        "node_config": {"association.maximum_pdu_size": 0,
                        "association.fast_polling": NODE_FAST_POLLING},
        "load_average_at_end": os.getloadavg(),
        "rounds": rounds,
        "notes": {"node": "fsyncs the file and its folder (folder fsyncs shared between "
                          "concurrent associations), commits the queue row (no WAL fsync: the "
                          "file is the durable record), then answers Success",
                  "storescp": "storescp -od DIR, no fsync",
                  "orthanc": "Orthanc default config (SQLite index, files on disk)"},
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(report, indent=2))
    if args.out and not args.only:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
