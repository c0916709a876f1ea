"""Reliability soak: kill -9 the DICOM node mid-push, restart it, and count acknowledged instances
that were lost. The figure a PACS administrator asks for first: "kill cycles run, instances lost".

    python -m bench.reliability [--cycles 10] [--seed 0] [--study DIR] [--with-app]
                                [--ingest-journal true|false] [--power-cut]
                                [--out bench/results/reliability.json]

Each cycle, on a fresh spool:

1. start the node (``python -m deploy.node``) with the example configuration
   (``deploy/node.example.yaml``) and only what a test bench must change: loopback port, temporary
   spool, calling AE title, no destinations, ``study_quiet_seconds: 1``, ``min_free_mb: 1``;
2. push the simulated study with ``storescu -v`` (``TCP_NODELAY=1``) in the background and read its
   output: every ``Received Store Response (Success|Warning)`` after ``Sending file: X`` is an
   instance the node acknowledged;
3. a seeded random delay after the first acknowledgement, ``kill -9`` the node (if storescu had
   already finished, the kill lands after the push: the cycle is counted as not mid-push); with
   ``--power-cut`` (journal on), every instance file the journal still holds is then deleted,
   emptied or cut short (``harness.simulate_power_cut_loss``: what a power cut may take with the
   page cache), and the restart must replay exactly those;
4. restart the node on the same spool (it removes partial writes and reconciles) and check that
   every acknowledged SOP Instance UID is in the spool at ``instances/<study>/<series>/<sop>.dcm``,
   readable by pydicom, with a data set byte-identical to the source file's (the node stores the
   data set as received), and recorded in the queue (``instances`` table, same SHA-256 as the file);
5. push the whole study again and check every instance is stored exactly once (files == rows ==
   distinct SOP Instance UIDs == source instances, each byte-identical) and the study's job ends
   ``done``.

Without ``--with-app`` the app command is ``true {input} {output}`` (an existing program that
exits 0 and writes nothing) with ``app.require_dicom_results: false``: the job is created, run
and finished, but no QSM is computed. With ``--with-app`` the real app (``python -m app``) runs and
every other cycle also kills the node with -9 while the app runs, then checks the restarted node
requeues the job and finishes it. The JSON says which mode was used.

An instance that was sent but not yet acknowledged when the node died may or may not be in the
spool; that is allowed (the sender sends it again). "Lost" means acknowledged and missing, unreadable
or different; "duplicates" means more than one spool file or queue row for one SOP Instance UID.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import yaml

from bench.ingest import dcmtk_env, free_port
from bench.ingest import simulate_study as _simulate_study
from deploy.node.harness import NodeProcess, simulate_power_cut_loss, wait_for

REPO = Path(__file__).resolve().parents[1]
NODE_AET = "CMB_NODE"
SCU_AET = "SOAK_SCU"
ACK_MARKERS = ("Received Store Response (Success", "Received Store Response (Warning")


def simulate_study(out: Path, voxel_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)) -> Path:
    """Simulate the soak study (3 mm: about 470 instances); returns its DICOM folder."""
    return _simulate_study(out, voxel_mm)


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM Part 10 file: everything after the preamble and group 2."""
    data = path.read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path}: not a DICOM Part 10 file")
    # (0002,0000) UL group length comes first in group 2 (explicit VR little endian)
    if data[132:138] == b"\x02\x00\x00\x00UL":
        (group_len,) = struct.unpack("<I", data[140:144])
        return data[144 + group_len:]
    with open(path, "rb") as f:  # no group length: let pydicom walk group 2
        pydicom.filereader.read_preamble(f, False)
        pydicom.filereader._read_file_meta_info(f)
        return f.read()


@dataclass(frozen=True)
class SourceInstance:
    path: Path
    study: str
    series: str
    sop: str
    digest: str  # SHA-256 of the encoded data set


def load_sources(study_dir: Path) -> list[SourceInstance]:
    """Every DICOM file under ``study_dir``, with its UIDs and data-set digest."""
    out = []
    for p in sorted(study_dir.rglob("*")):
        if not p.is_file():
            continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append(SourceInstance(p, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                                  str(ds.SOPInstanceUID),
                                  hashlib.sha256(dataset_bytes(p)).hexdigest()))
    if not out:
        raise RuntimeError(f"no DICOM files under {study_dir}")
    return out


class Node(NodeProcess):
    """The node as a subprocess on a loopback port with its own spool (the config is written once)."""

    def __init__(self, root: Path, with_app: bool, ingest_journal: bool | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        port, spool = free_port(), root / "spool"
        cfg = yaml.safe_load((REPO / "deploy" / "node.example.yaml").read_text())
        cfg.update({"port": port, "bind": "127.0.0.1", "spool": str(spool),
                    "allowed_calling_aets": [SCU_AET], "destinations": [],
                    "study_quiet_seconds": 1.0, "min_free_mb": 1, "poll_seconds": 0.1})
        if ingest_journal is not None:
            cfg["ingest_journal"] = ingest_journal
        self.ingest_journal = bool(cfg.get("ingest_journal", True))
        if not with_app:
            cfg["app"] = dict(cfg["app"], command=["true", "{input}", "{output}"],
                              require_dicom_results=False)
        else:
            cfg["app"] = dict(cfg["app"], require_dicom_results=False, max_attempts=3)
        (root / "node.yaml").write_text(yaml.safe_dump(cfg))
        super().__init__(root, root / "node.yaml", port, spool)


class Push:
    """``storescu -v`` of a list of files in the background; records acknowledged files."""

    def __init__(self, port: int, files: list[Path]) -> None:
        self.acked: list[str] = []
        self.first_ack = threading.Event()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["storescu", "-v", "-aet", SCU_AET, "-aec", NODE_AET, "127.0.0.1", str(port),
             *map(str, files)], env=dcmtk_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        current = None
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Sending file:" in line:
                current = line.split("Sending file:", 1)[1].strip()
            elif line.startswith(("I: ", "W: ")) and any(m in line for m in ACK_MARKERS):
                if current is not None:
                    self.acked.append(current)
                    current = None
                    self.first_ack.set()

    def wait(self, timeout: float = 300.0) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=30)
        self.first_ack.set()
        return rc


@dataclass
class Cycle:
    cycle: int
    kill_delay_s: float
    instances_acknowledged: int
    killed_mid_push: bool
    instances_lost: int
    lost_sop_uids: list[str]
    instances_altered: int
    instances_missing_from_queue: int
    partial_writes_removed: int
    instances_registered_by_reconcile: int
    duplicates: int
    complete_after_repush: bool
    job_state: str
    app_killed: bool = False
    app_kill_job_requeued: bool | None = None
    app_kill_orphan_stopped: bool | None = None
    job_attempts: int = 0
    app_seconds_last_attempt: float | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    power_cut_files_lost: int = 0  # journalled files deleted/emptied/cut (simulated power cut)
    journal_files_rewritten: int = 0


def _check_spool(node: Node, sources: list[SourceInstance], want: set[str]) -> tuple[list[str], int, int]:
    """For the SOP Instance UIDs in ``want``: (lost, altered-but-present, missing from queue)."""
    rows = {sop: (path, sha) for sop, path, sha in
            node.rows("SELECT sop_instance_uid, path, sha256 FROM instances")}
    lost, altered, not_queued = [], 0, 0
    for s in sources:
        if s.sop not in want:
            continue
        f = node.spool / "instances" / s.study / s.series / f"{s.sop}.dcm"
        try:
            ds = pydicom.dcmread(f)
            ok = (str(ds.SOPInstanceUID) == s.sop and
                  hashlib.sha256(dataset_bytes(f)).hexdigest() == s.digest)
        except Exception:
            ok = False
        if not ok:
            lost.append(s.sop)
            altered += f.exists()
            continue
        row = rows.get(s.sop)
        if row is None or row[1] != hashlib.sha256(f.read_bytes()).hexdigest():
            not_queued += 1
    return lost, altered, not_queued


def _duplicates(node: Node) -> int:
    files = list((node.spool / "instances").glob("*/*/*.dcm"))
    by_sop: dict[str, int] = {}
    for f in files:
        by_sop[f.stem] = by_sop.get(f.stem, 0) + 1
    n_rows, n_distinct = node.rows("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances")[0]
    return sum(n - 1 for n in by_sop.values()) + (n_rows - n_distinct)


def _gone(pid: int) -> bool:
    """True once process ``pid`` has exited (no longer in /proc, or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def run_cycle(i: int, sources: list[SourceInstance], root: Path, rng: random.Random,
              kill_delay_s: tuple[float, float], with_app: bool, kill_app: bool,
              ingest_journal: bool | None = None, power_cut: bool = False) -> Cycle:
    """One kill cycle on a fresh spool under ``root``; see the module docstring."""
    t0 = time.monotonic()
    files = [s.path for s in sources]
    sop_of = {str(s.path): s.sop for s in sources}
    study = sources[0].study
    delay = rng.uniform(*kill_delay_s)
    node = Node(root, with_app, ingest_journal)
    node.start()
    try:
        push = Push(node.port, files)
        if not push.first_ack.wait(timeout=120):
            raise RuntimeError("storescu got no acknowledgement in 120 s")
        time.sleep(delay)
        finished_before_kill = push.proc.poll() is not None
        node.kill9()
        rc = push.wait()
        acked = {sop_of[f] for f in push.acked}
        mid_push = not finished_before_kill and len(acked) < len(sources)
        notes = [] if mid_push else ["storescu finished before the kill"]
        if mid_push and rc == 0:
            notes.append("storescu exited 0 although the node was killed")
        damaged = simulate_power_cut_loss(node.spool) if power_cut and node.ingest_journal else 0

        node.start()
        recovered = node.events("node_recovered")[-1]
        if int(recovered.get("journal_files_rewritten", 0)) != damaged:
            notes.append(f"replay rewrote {recovered.get('journal_files_rewritten')} files, "
                         f"{damaged} were lost or damaged")
        lost, altered, not_queued = _check_spool(node, sources, acked)

        again = Push(node.port, files)
        rc2 = again.wait()
        all_sops = {s.sop for s in sources}
        lost2, _, not_queued2 = _check_spool(node, sources, all_sops)
        n_files = len(list((node.spool / "instances").glob("*/*/*.dcm")))
        complete = (rc2 == 0 and len(again.acked) == len(files) and not lost2 and not not_queued2
                    and n_files == len(all_sops))
        if not complete:
            notes.append(f"re-push rc={rc2} acked={len(again.acked)}/{len(files)} "
                         f"missing={len(lost2)} unqueued={not_queued2} files={n_files}")

        final = ("done", "delivered", "failed", "skipped")

        def jobs_finished() -> list[tuple[Any, ...]] | None:
            rows = node.rows("SELECT id, state, attempts, n_instances, started_at, finished_at "
                             "FROM jobs WHERE study_uid = ? ORDER BY id", study)
            return rows if rows and all(r[1] in final for r in rows) else None

        app_killed, requeued, orphan_stopped = False, None, None
        if with_app and kill_app:
            running = wait_for(lambda: node.rows(
                "SELECT id, app_pid FROM jobs WHERE study_uid = ? AND state = 'running' "
                "AND app_pid IS NOT NULL", study), 120, "the app to start")
            time.sleep(rng.uniform(0.5, 3.0))
            node.kill9()
            app_killed = True
            node.start()
            rec = node.events("node_recovered")[-1]
            requeued = running[0][0] in rec.get("jobs_requeued", [])
            orphan_stopped = bool(wait_for(lambda: _gone(running[0][1]), 30, "the orphaned app to stop"))
        timeout = 3600 if with_app else 120
        jobs = wait_for(jobs_finished, timeout, "the study's jobs to finish")
        _, state, attempts, n_inst, started, finished = jobs[-1]
        app_s = round(finished - started, 2) if started and finished else None
        if n_inst != len(sources):
            notes.append(f"the newest job covers {n_inst} of {len(sources)} instances")
        return Cycle(i, round(delay, 3), len(acked), mid_push, len(lost), lost, altered, not_queued,
                     int(recovered.get("partial_writes_removed", 0)),
                     int(recovered.get("instances_registered", 0)), _duplicates(node), complete,
                     state, app_killed, requeued, orphan_stopped, int(attempts), app_s,
                     [{"id": j[0], "state": j[1], "attempts": j[2], "n_instances": j[3]}
                      for j in jobs], round(time.monotonic() - t0, 2), notes,
                     damaged, int(recovered.get("journal_files_rewritten", 0)))
    finally:
        node.stop()


def run_cycles(study_dir: Path, cycles: int = 10, seed: int = 0,
               kill_delay_s: tuple[float, float] = (0.0, 2.0), with_app: bool = False,
               work: Path | None = None, keep: bool = False, ingest_journal: bool | None = None,
               power_cut: bool = False) -> dict[str, Any]:
    """Run ``cycles`` kill cycles against the study in ``study_dir``; returns the summary dict.

    ``kill_delay_s``: the kill comes uniform(lo, hi) seconds (seeded) after the first
    acknowledgement. Each cycle uses a fresh spool under ``work`` (a temp folder by default,
    deleted unless ``keep``). ``ingest_journal``: the node's setting (None: the example config's).
    ``power_cut`` (journal on only): after the kill, delete / empty / cut short every instance file
    the journal still holds (not yet fsynced: what a power cut may lose), before the restart.
    """
    if shutil.which("storescu") is None:
        raise RuntimeError("storescu (DCMTK) is not installed")
    sources = load_sources(study_dir)
    if len({s.study for s in sources}) != 1:
        raise RuntimeError(f"{study_dir}: expected one study")
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="soak-", dir=work))
    results: list[Cycle] = []
    try:
        for i in range(cycles):
            results.append(run_cycle(i, sources, tmp / f"cycle-{i:02d}", rng, kill_delay_s,
                                     with_app, kill_app=(i % 2 == 1),
                                     ingest_journal=ingest_journal, power_cut=power_cut))
            c = results[-1]
            print(f"cycle {i}: acked {c.instances_acknowledged}/{len(sources)} "
                  f"(mid-push {c.killed_mid_push}), lost {c.instances_lost}, dup {c.duplicates}, "
                  f"job {c.job_state}, {c.seconds} s", flush=True)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    acked = sum(c.instances_acknowledged for c in results)
    return {
        "simulated": True,
        "what": "kill -9 of the node during a storescu push, restart, check every acknowledged "
                "instance; then re-push and check the study completes",
        "study": {"instances": len(sources), "series": len({s.series for s in sources}),
                  "source": str(study_dir)},
        "app": ("real app (python -m app), node also killed -9 while it runs in odd cycles"
                if with_app else "no-op: app.command 'true {input} {output}' with "
                "require_dicom_results: false (jobs are created and run, no QSM computed)"),
        "config": "deploy/node.example.yaml with port/bind/spool/allowed_calling_aets/destinations "
                  "changed, study_quiet_seconds 1, min_free_mb 1, poll_seconds 0.1",
        "ingest_journal": ingest_journal if ingest_journal is not None else "example config",
        "simulated_power_cut": power_cut,
        "power_cut_files_lost": sum(c.power_cut_files_lost for c in results),
        "journal_files_rewritten": sum(c.journal_files_rewritten for c in results),
        "seed": seed, "kill_delay_s_after_first_ack": list(kill_delay_s),
        "cycles_run": len(results),
        "cycles_killed_mid_push": sum(c.killed_mid_push for c in results),
        "instances_acknowledged_before_kill": acked,
        "instances_lost": sum(c.instances_lost for c in results),
        "instances_altered": sum(c.instances_altered for c in results),
        "instances_missing_from_queue": sum(c.instances_missing_from_queue for c in results),
        "duplicates": sum(c.duplicates for c in results),
        "cycles_complete_after_repush": sum(c.complete_after_repush for c in results),
        "cycles_newest_job_done_with_whole_study": sum(
            c.job_state in ("done", "delivered") and c.jobs[-1]["n_instances"] == len(sources)
            for c in results),
        "jobs_failed": sum(j["state"] == "failed" for c in results for j in c.jobs),
        "app_kills": sum(c.app_killed for c in results),
        "app_kills_requeued": sum(bool(c.app_kill_job_requeued) for c in results),
        "seconds_per_cycle_mean": round(sum(c.seconds for c in results) / max(len(results), 1), 2),
        "seconds_per_cycle_max": max((c.seconds for c in results), default=0.0),
        "cycles": [asdict(c) for c in results],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--study", type=Path, help="DICOM folder of one study (default: simulate one, "
                    "training.simulate --voxel-mm 3 3 3)")
    ap.add_argument("--kill-delay", type=float, nargs=2, default=(0.0, 2.0), metavar=("LO", "HI"),
                    help="kill uniform(LO, HI) s after the first acknowledgement")
    ap.add_argument("--with-app", action="store_true", help="run the real app (slow)")
    ap.add_argument("--ingest-journal", choices=["true", "false"],
                    help="the node's ingest_journal (default: the example config's, true)")
    ap.add_argument("--power-cut", action="store_true",
                    help="journal on: also delete/empty/cut the un-checkpointed instance files "
                         "after each kill, as a power cut may")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reliability.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-study-") as tmp:
        study = args.study or simulate_study(Path(tmp))
        journal = None if args.ingest_journal is None else args.ingest_journal == "true"
        res = run_cycles(study, args.cycles, args.seed, tuple(args.kill_delay), args.with_app,
                         ingest_journal=journal, power_cut=args.power_cut)
    if args.study is None:
        res["study"]["source"] = "training.simulate --subjects 1 --seed 1 --voxel-mm 3 3 3"
    res["command"] = "python -m bench.reliability " + " ".join(argv if argv is not None else sys.argv[1:])
    res["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                      "load_average_1m": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"kill cycles run: {res['cycles_run']} ({res['cycles_killed_mid_push']} mid-push), "
          f"instances acknowledged: {res['instances_acknowledged_before_kill']}, "
          f"instances lost: {res['instances_lost']}, duplicates: {res['duplicates']}, "
          f"complete after re-push: {res['cycles_complete_after_repush']}/{res['cycles_run']}, "
          f"{res['seconds_per_cycle_mean']} s per cycle")
    return 0 if res["instances_lost"] == 0 and res["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
