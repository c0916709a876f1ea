"""Cohort runs, one task per subject, in this process or on a Dask distributed cluster.

``python -m training.predict`` and ``python -m training.dataset`` take ``--cluster SPEC``:

* no ``--cluster``: the subjects run one after the other in this process (Dask is not imported);
* ``--cluster local`` / ``local:N``: a :class:`distributed.LocalCluster` on this machine with N
  worker processes of one thread each (``local`` alone: one worker per core, fewer when the memory
  would not hold :data:`MEMORY_PER_WORKER_GB` per worker);
* ``--cluster tcp://HOST:PORT``: connect to a running Dask scheduler (its workers may be anywhere).

Every subject is one task. A subject whose outputs are complete is skipped (its record is read back
from disk), so an interrupted cohort is resumed by running the same command again; outputs are
written to a temporary name and moved into place with :func:`os.replace` (:func:`atomic_write`), so
a half-written subject never counts as finished. A failing subject is reported with its id and a
one-line error and does not stop the others; the command exits non-zero when any subject failed.

Workers on a ``tcp://`` cluster must import this repository and read the same paths: start them
with the repository root on ``PYTHONPATH`` (and its requirements installed), with the cohort, the
output folder and the model folder on a file system they share with the client, mounted at the same
paths. Each worker loads the detector once and keeps it (``training.predict._detector``); tasks
carry paths, never arrays or weights. Typical set-ups (dask-jobqueue and dask-kubernetes are not
requirements of this repository; install them where the cluster runs)::

    # one machine: a scheduler and workers by hand
    dask scheduler --host 10.0.0.1 --port 8786
    PYTHONPATH=/srv/cmb dask worker tcp://10.0.0.1:8786 --nworkers 8 --nthreads 1
    python -m training.predict --cohort /data/cohort --out /data/preds --cluster tcp://10.0.0.1:8786

    # SLURM (dask-jobqueue): each job is one worker process of one thread
    from dask_jobqueue import SLURMCluster
    cluster = SLURMCluster(cores=1, processes=1, memory="8GB", walltime="04:00:00",
                           job_script_prologue=["export PYTHONPATH=/srv/cmb", "source /srv/cmb/.venv/bin/activate"])
    cluster.scale(jobs=32)
    print(cluster.scheduler_address)   # -> --cluster tcp://...:PORT (keep this Python process alive)

    # Kubernetes (dask-kubernetes operator, or the dask/dask Helm chart): an image with the repository
    # and its models, the data on a shared volume
    from dask_kubernetes.operator import KubeCluster
    cluster = KubeCluster(name="cmb", image="registry.example/cmb-node:1", n_workers=16,
                          env={"PYTHONPATH": "/app"}, resources={"limits": {"cpu": "1", "memory": "8Gi"}})
    print(cluster.scheduler_address)

Written by hand: the spec parser, the skip/failure bookkeeping and the loop over
:func:`distributed.as_completed`; Dask does the scheduling, the worker processes and the transport.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: files made by atomic_write get the usual 0o666 & ~umask, not mkstemp's 0o600
MEMORY_PER_WORKER_GB = 4.0  # a 1 mm study through QSM + detection peaks around 2-3 GB


class ClusterSpecError(ValueError):
    """A ``--cluster`` value that is neither ``local[:N]`` nor ``tcp://HOST:PORT``."""


@dataclass(frozen=True)
class ClusterSpec:
    """Parsed ``--cluster``: ``kind`` is ``"local"`` (``workers`` processes) or ``"tcp"`` (``address``)."""

    kind: str
    workers: int | None = None
    address: str | None = None


def default_workers() -> int:
    """Worker processes for ``--cluster local``: one per core, at most one per MEMORY_PER_WORKER_GB."""
    cores = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(mem_gb // MEMORY_PER_WORKER_GB)))


def parse_cluster(spec: str) -> ClusterSpec:
    """``local``, ``local:N`` (N >= 1) or ``tcp://HOST:PORT``; anything else raises ClusterSpecError."""
    s = spec.strip()
    m = re.fullmatch(r"local(?::(\d+))?", s)
    if m:
        n = int(m.group(1)) if m.group(1) is not None else default_workers()
        if n < 1:
            raise ClusterSpecError(f"--cluster {spec!r}: local:N needs N >= 1 worker")
        return ClusterSpec("local", workers=n)
    m = re.fullmatch(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d+)", s)
    if m:
        port = int(m.group(2))
        if not 0 < port < 65536:
            raise ClusterSpecError(f"--cluster {spec!r}: port {port} is not in 1-65535")
        return ClusterSpec("tcp", address=s)
    raise ClusterSpecError(f"--cluster {spec!r}: expected 'local', 'local:N' or 'tcp://HOST:PORT'")


def add_cohort_arguments(parser, redo_help: str) -> None:
    """The options every cohort command shares: ``--cluster``, ``--threads``, ``--redo``,
    ``--no-progress`` (``training.predict``, ``training.dataset``)."""
    parser.add_argument("--cluster", default=None, metavar="SPEC",
                        help="local, local:N or tcp://HOST:PORT (a Dask scheduler); default: in this process")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per subject (default: torch's own here, 1 on a cluster)")
    parser.add_argument("--redo", action="store_true", help=redo_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def check_cohort_arguments(parser, args) -> None:
    """``parser.error`` (exit 2, one line) for a bad ``--threads`` or ``--cluster``."""
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.cluster is not None:
        try:
            parse_cluster(args.cluster)
        except ClusterSpecError as exc:
            parser.error(str(exc))


def atomic_write(path: Path | str, write: Callable) -> Path:
    """Call ``write(fh)`` on a temporary file (binary) beside ``path``, then move it onto ``path``.

    The temporary name starts with a dot and ends in ``.tmp``, so globs such as ``*.npz`` or
    ``*.json`` never see it; a crash leaves the old file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            os.fchmod(fh.fileno(), 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path | str, text: str) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


@dataclass
class Outcome:
    """What happened to one subject: ``status`` is ``done``, ``skipped`` or ``failed``."""

    subject: str
    status: str
    record: dict | None = None
    error: str | None = None


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0]}" if msg else type(exc).__name__


def run_subjects(
    subjects: Sequence[str],
    task: Callable[[str], dict],
    *,
    completed: Callable[[str], dict | None],
    cluster: str | None = None,
    describe: Callable[[str, dict], str] | None = None,
    progress: bool = True,
) -> list[Outcome]:
    """Run ``task(subject)`` for every subject whose ``completed(subject)`` is None.

    ``completed`` returns the record of a finished subject read back from disk, or None when its
    outputs are missing or incomplete. ``task`` must be picklable for a cluster (a module-level
    function, or a :func:`functools.partial` of one). ``cluster``: None runs in this process,
    otherwise a spec for :func:`parse_cluster`. Returns one Outcome per subject, in input order.
    """
    spec = parse_cluster(cluster) if cluster is not None else None
    outcomes: dict[str, Outcome] = {}
    todo = []
    for s in subjects:
        rec = completed(s)
        if rec is not None:
            outcomes[s] = Outcome(s, "skipped", rec)
        else:
            todo.append(s)
    from tqdm import tqdm

    bar = tqdm(total=len(subjects), initial=len(subjects) - len(todo), unit="subject", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)

    def report(o: Outcome) -> None:
        outcomes[o.subject] = o
        if o.status == "failed":
            line = f"{o.subject}: FAILED {o.error}"
        else:
            line = describe(o.subject, o.record) if describe else f"{o.subject}: done"
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        bar.update(1)

    try:
        if todo and spec is None:
            for s in todo:
                try:
                    report(Outcome(s, "done", task(s)))
                except Exception as exc:  # one subject's failure is reported, the others go on
                    report(Outcome(s, "failed", error=one_line(exc)))
        elif todo:
            _run_dask(spec, todo, task, report)
    finally:
        bar.close()
    return [outcomes[s] for s in subjects]


def _run_dask(spec: ClusterSpec, todo: Sequence[str], task: Callable[[str], dict],
              report: Callable[[Outcome], None]) -> None:
    from distributed import Client, LocalCluster, as_completed

    local = None
    if spec.kind == "local":
        local = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                             dashboard_address=None)
        client = Client(local)
    else:
        try:
            client = Client(spec.address, timeout="30s")
        except OSError as exc:
            raise ClusterSpecError(f"--cluster {spec.address}: cannot reach the scheduler ({one_line(exc)})") from exc
    try:
        # pure=False: a subject is a side effect (files), never deduplicated; retries=0: a failed
        # subject is reported, not run again behind the user's back
        run_id = uuid.uuid4().hex[:8]  # two runs on one scheduler never share a key
        futures = {client.submit(task, s, key=f"subject-{s}-{run_id}", pure=False): s for s in todo}
        for fut in as_completed(futures):
            s = futures[fut]
            if fut.status == "finished":
                report(Outcome(s, "done", fut.result()))
            else:
                try:
                    exc = fut.exception()
                except Exception as e:  # cancelled futures raise instead of returning
                    exc = e
                report(Outcome(s, "failed", error=one_line(exc)))
            fut.release()
    finally:
        client.close()
        if local is not None:
            local.close()


def summarise(outcomes: Sequence[Outcome]) -> int:
    """Print the failed subjects and counts to stderr; 0 when none failed, else 1."""
    failed = [o for o in outcomes if o.status == "failed"]
    n_done = sum(o.status == "done" for o in outcomes)
    n_skip = sum(o.status == "skipped" for o in outcomes)
    print(f"{n_done} subject(s) run, {n_skip} already complete (skipped), {len(failed)} failed",
          file=sys.stderr)
    for o in failed:
        print(f"error: {o.subject}: {o.error}", file=sys.stderr)
    return 1 if failed else 0
