"""Workers: run the app on a snapshot of a study and collect the DICOM files it writes.

A worker claims the oldest queued job, links the study's instances (as of the claim) into
``jobs/<id>/attempt-<n>/input/<series>/<sop>.dcm``, runs the app command in its own process group
with a timeout (``{input}`` / ``{output}`` substituted; ``HOLOSCAN_INPUT_PATH`` /
``HOLOSCAN_OUTPUT_PATH`` also set), and keeps the app's stdout+stderr in ``attempt-<n>/app.log``.
Each attempt has its own folder, so an app orphaned by a node crash cannot write into the folder
of the re-run (and the restart kills such an orphan: see :func:`stop_orphan_app`). On exit 0 every DICOM
file under the output folder is fsynced and queued for delivery to every destination; other
files (JSON, logs) stay in the job folder. A non-zero exit, a timeout or no DICOM output fails the
attempt; the job is re-queued until ``app.max_attempts`` is reached, then 'failed' with the reason.

Prestart (``app.prestart_command``, on for the default app): each worker keeps one app process
started ahead of its job, with stdin a pipe and stdout+stderr in ``jobs/prestart-<worker>.log``.
The app does its imports (about 8 of a 1 mm study's seconds on 2 cores) and waits on stdin; a
claimed job is handed over as one JSON line ``{"input": ..., "output": ...}`` and stdin closed,
the log file is moved to the attempt's ``app.log``, and from there on the attempt is the same as a
started one (timeout, process group kill, exit status). A prestarted process that died meanwhile
is replaced by a plain start of ``command``. The next one is started when the job ends. If the node
dies, a waiting prestarted app reads end-of-file and exits without doing anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from .config import NodeConfig
from .logs import log_event
from .queue import Queue, ResultFile
from .spool import Spool, fsync_dir, fsync_file


def collect_results(output: Path, spool_root: Path) -> list[ResultFile]:
    """Every readable DICOM file under ``output`` (fsynced), with its UIDs; others are ignored."""
    results = []
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sop = str(ds.SOPInstanceUID)
            sop_class = str(ds.SOPClassUID)
            ts = str(ds.file_meta.TransferSyntaxUID)
        except Exception:
            continue
        fsync_file(path)
        results.append(ResultFile(str(path.relative_to(spool_root)), sop, sop_class, ts))
    for d in {p.parent for p in output.rglob("*") if p.is_file()} | {output}:
        fsync_dir(d)
    return results


def stop_orphan_app(pid: int | None, attempt_dir: Path) -> bool:
    """Kill the process group of an app left running by a crashed node. Returns True if killed.

    The pid is trusted only if its command line still names the attempt folder (a pid may have been
    reused by an unrelated process since).
    """
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    try:  # a prestarted app names no folder on its command line; its stdout is the attempt's log
        stdout = os.readlink(f"/proc/{pid}/fd/1")
    except OSError:
        stdout = ""
    if str(attempt_dir) not in cmdline and not stdout.startswith(str(attempt_dir) + os.sep):
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _last_line(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


class Worker:
    """One worker thread (the node starts ``workers`` of them)."""

    def __init__(self, name: str, cfg: NodeConfig, spool: Spool, queue: Queue,
                 wake: threading.Event, on_done: Callable[[], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.cfg = cfg
        self.spool = spool
        self.queue = queue
        self.wake = wake
        self.on_done = on_done
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[Any] | None = None
        self._ready: tuple[subprocess.Popen[Any], Path] | None = None  # prestarted app + its log

    def run_once(self) -> bool:
        """Claim and run one job; False when nothing was queued."""
        claimed = self.queue.claim_job(self.clock())
        if claimed is None:
            return False
        job, instances = claimed
        try:
            self._run_job(job, instances)
        finally:
            if not self._stop.is_set():
                self._prestart()  # after the job is recorded: its imports do not slow the delivery
        return True

    def _run_job(self, job: Any, instances: list[Any]) -> None:
        job_id, study = job["id"], job["study_uid"]
        calling = instances[0]["calling_aet"] if instances else None
        app = self.cfg.app
        jobdir = self.spool.job_dir(job_id) / f"attempt-{job['attempts']}"
        inp, out, logf = jobdir / "input", jobdir / "output", jobdir / "app.log"
        log_event("job_started", study_uid=study, calling_aet=calling, job_id=job_id,
                  attempt=job["attempts"], instances=len(instances), worker=self.name)
        try:
            self.spool.snapshot([(self.spool.root / r["path"], f"{r['series_uid']}/{r['sop_instance_uid']}.dcm")
                                 for r in instances], inp)
            if out.exists():
                shutil.rmtree(out)
            out.mkdir(parents=True)
        except OSError as exc:
            self._fail(job_id, study, calling, f"cannot prepare the job folder: {exc}")
            return
        cmd = [c.replace("{input}", str(inp)).replace("{output}", str(out)) for c in app.command]
        env = dict(os.environ, HOLOSCAN_INPUT_PATH=str(inp), HOLOSCAN_OUTPUT_PATH=str(out))
        started = time.monotonic()
        try:
            self._proc = self._hand_over(inp, out, logf)
            prestarted = self._proc is not None
            if self._proc is None:
                with open(logf, "wb") as log:
                    self._proc = subprocess.Popen(cmd, cwd=app.cwd, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                  start_new_session=True)
        except OSError as exc:
            self._fail(job_id, study, calling, f"cannot start the app ({cmd[0]}): {exc.strerror}")
            return
        self.queue.set_app_pid(job_id, self._proc.pid)
        log_event("app_started", study_uid=study, job_id=job_id, pid=self._proc.pid, prestarted=prestarted)
        try:
            rc = self._proc.wait(timeout=app.timeout_seconds)
        except subprocess.TimeoutExpired:
            self._kill()
            self._fail(job_id, study, calling,
                       f"app timed out after {app.timeout_seconds:g} s (killed)")
            return
        finally:
            proc, self._proc = self._proc, None
        seconds = round(time.monotonic() - started, 3)
        if self._stop.is_set() and rc != 0:
            return  # node shutting down: the job stays 'running' and is re-queued at the next start
        if rc != 0:
            tail = _last_line(logf)
            self._fail(job_id, study, calling,
                       f"app exited with code {rc}" + (f": {tail}" if tail else ""))
            return
        results = collect_results(out, self.spool.root)
        if not results and self.cfg.app.require_dicom_results:
            self._fail(job_id, study, calling, "app exited 0 but wrote no DICOM file")
            return
        self.queue.finish_job(job_id, results, [d.name for d in self.cfg.destinations], self.clock())
        log_event("job_done", study_uid=study, calling_aet=calling, job_id=job_id,
                  results=len(results), app_seconds=seconds, pid=proc.pid)
        self.on_done()

    def _prestart(self) -> None:
        """Start the next app ahead of its job (``app.prestart_command``), if configured."""
        cmd = self.cfg.app.prestart_command
        if not cmd or self._ready is not None:
            return
        log = self.spool.jobs / f"prestart-{self.name}.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "wb") as fh:
                proc = subprocess.Popen(list(cmd), cwd=self.cfg.app.cwd, stdin=subprocess.PIPE,
                                        stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log_event("prestart_failed", level="warning", worker=self.name, error=str(exc))
            return
        self._ready = (proc, log)

    def _hand_over(self, inp: Path, out: Path, logf: Path) -> subprocess.Popen[Any] | None:
        """Give the job to the prestarted app; None if there is none alive (start ``command`` then)."""
        ready, self._ready = self._ready, None
        if ready is None:
            return None
        proc, log = ready
        if proc.poll() is not None:
            log_event("prestart_died", level="warning", worker=self.name, exit_code=proc.returncode,
                      last_line=_last_line(log))
            return None
        os.replace(log, logf)  # the open file moves with it: the app keeps writing to app.log
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"input": str(inp), "output": str(out)}).encode() + b"\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            proc.wait()
            return None
        return proc

    def _fail(self, job_id: int, study: str, calling: str | None, reason: str) -> None:
        state = self.queue.fail_job(job_id, reason, self.cfg.app.max_attempts, self.clock())
        log_event("job_failed", level="error" if state == "failed" else "warning", study_uid=study,
                  calling_aet=calling, job_id=job_id, reason=reason, job_state=state)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.run_once():
                    continue
            except Exception as exc:
                log_event("worker_error", level="error", worker=self.name,
                          error=f"{type(exc).__name__}: {exc}")
            self.wake.wait(self.cfg.poll_seconds)
            self.wake.clear()

    def start(self) -> None:
        self._prestart()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._kill()
        ready, self._ready = self._ready, None
        if ready is not None:  # end-of-file on stdin makes a waiting app exit; kill it if it hangs
            try:
                if ready[0].stdin is not None:
                    ready[0].stdin.close()
                ready[0].wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(ready[0].pid, signal.SIGKILL)
                ready[0].wait()
        if self._thread is not None:
            self._thread.join(timeout=10)
