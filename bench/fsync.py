"""Durability latency on this disk: what one durable instance costs before the node may answer.

    python -m bench.fsync [--dir DIR] [--n 300] [--size 25600 153600]
                          [--out bench/results/fsync.json]

Measures, each ``--n`` times in a fresh folder on the spool's file system (default: a temp folder
under bench/results/../, i.e. the checkout's disk):

* ``write_fsync_<size>``: create a temp file, write ``size`` bytes, fsync it, close (one instance's
  data; 25 KiB is the simulated study's instance, 150 kB a typical 512x512 MR slice);
* ``rename_fsync_dir``: rename a file into a folder and fsync the folder (the directory entry);
* ``instance_<size>``: the whole per-instance path the node takes (write+fsync, rename, folder
  fsync);
* ``group_<k>x<size>``: k files written, each fsynced, then one rename each and one folder fsync:
  the cost of a group commit of k instances (divide by k for the per-instance share);
* ``sqlite_commit_full`` / ``sqlite_commit_normal``: one INSERT + COMMIT of a ~300-byte row in a
  WAL database with ``synchronous=FULL`` (WAL fsynced at commit) and ``NORMAL`` (not fsynced);
* ``fdatasync_append_<size>``: append ``size`` bytes to one preallocated (``posix_fallocate``)
  log file and fdatasync (what the spool journal pays per group); ``..._zeroed_`` the same on a
  file whose blocks were written with zeros first, ``..._growing_`` on a file that each append
  extends: if the three agree, the cost is the disk's flush, not ext4 metadata.

Percentiles are over wall-clock per operation (time.perf_counter), in milliseconds. Written by
hand: no library measures exactly these sequences.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import write_result
from deploy.node.spool import fsync_dir  # the node's own folder fsync, timed as it runs

REPO = Path(__file__).resolve().parents[1]


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * (len(s) - 1)))))
    return s[k]


def summary(ms: list[float]) -> dict[str, float]:
    return {"n": len(ms), "min_ms": round(min(ms), 3), "p10_ms": round(_pct(ms, 10), 3),
            "p50_ms": round(_pct(ms, 50), 3), "p90_ms": round(_pct(ms, 90), 3),
            "p99_ms": round(_pct(ms, 99), 3), "mean_ms": round(statistics.fmean(ms), 3),
            "max_ms": round(max(ms), 3)}


def _write(path: Path, data: bytes, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def timed(n: int, op: Callable[[int], None]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        op(i)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def measure(root: Path, n: int, sizes: list[int], groups: list[int]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    tmp, final = root / "tmp", root / "final"
    tmp.mkdir()
    final.mkdir()
    fsync_dir(root)
    for size in sizes:
        data = os.urandom(size)
        res[f"write_fsync_{size}"] = summary(timed(n, lambda i: _write(tmp / f"w{size}_{i}", data)))
        res[f"write_nosync_{size}"] = summary(timed(
            n, lambda i: _write(tmp / f"u{size}_{i}", data, sync=False)))

        def instance(i: int) -> None:
            _write(tmp / f"i{size}_{i}.part", data)
            os.replace(tmp / f"i{size}_{i}.part", final / f"i{size}_{i}.dcm")
            fsync_dir(final)
        res[f"instance_{size}"] = summary(timed(n, instance))
        for k in groups:
            def group(i: int) -> None:
                names = [f"g{size}_{k}_{i}_{j}" for j in range(k)]
                for nm in names:
                    _write(tmp / nm, data)
                for nm in names:
                    os.replace(tmp / nm, final / nm)
                fsync_dir(final)
            res[f"group_{k}x{size}"] = summary(timed(max(10, n // k), group))
        for prep, key in (("fallocate", f"fdatasync_append_{size}"),
                          ("zeroed", f"fdatasync_append_zeroed_{size}"),
                          ("growing", f"fdatasync_append_growing_{size}")):
            log = root / f"segment_{prep}_{size}.log"
            fd = os.open(log, os.O_WRONLY | os.O_CREAT, 0o640)
            try:
                if prep == "fallocate":  # what the journal does (unwritten extents)
                    os.posix_fallocate(fd, 0, size * (n + 1))
                elif prep == "zeroed":  # blocks written once: no extent conversion at all
                    os.pwrite(fd, bytes(size * (n + 1)), 0)
                os.fsync(fd)  # "growing": each append extends the file (size metadata)

                def append(i: int, fd: int = fd) -> None:
                    os.pwrite(fd, data, i * size)
                    os.fdatasync(fd)
                res[key] = summary(timed(n, append))
            finally:
                os.close(fd)

    def rename_dir(i: int) -> None:
        os.replace(tmp / f"w{sizes[0]}_{i}", final / f"r{i}")
        fsync_dir(final)
    res["rename_fsync_dir"] = summary(timed(n, rename_dir))
    res["fsync_dir_unchanged"] = summary(timed(n, lambda i: fsync_dir(final)))

    for mode in ("FULL", "NORMAL"):
        db = sqlite3.connect(root / f"q_{mode}.sqlite", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={mode}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT, b TEXT, c REAL)")
        row = ("1.2.826.0.1.3680043.8.498." + "1" * 38, "x" * 200)

        def commit(i: int) -> None:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (a, b, c) VALUES (?, ?, ?)", (*row, float(i)))
            db.execute("COMMIT")
        res[f"sqlite_commit_{mode.lower()}"] = summary(timed(n, commit))
        db.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=REPO / "bench",
                    help="folder on the disk to measure (a temp folder is made inside)")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, nargs="+", default=[25600, 153600])
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fsync.json")
    args = ap.parse_args(argv)
    if args.n < 10:
        ap.error("--n must be at least 10")
    with tempfile.TemporaryDirectory(prefix="cmb-fsync-", dir=args.dir) as tmp:
        t0 = time.time()
        res = measure(Path(tmp), args.n, args.size, args.groups)
        st = os.statvfs(tmp)
    write_result(args.out, {
        "what": "per-operation wall time of the durability steps on this disk (ms)",
        "dir_filesystem_block": st.f_bsize,
        "results": res,
        "seconds": round(time.time() - t0, 1),
    }, command=["python", "-m", "bench.fsync", *(argv if argv is not None else sys.argv[1:])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
