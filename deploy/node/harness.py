"""The node as a child process, for the code that drives it from outside: the peer and soak tests
(tests/integration/test_node_peers.py, test_node_soak.py) and the benchmarks (bench/reliability.py,
bench/end_to_end.py). One way to start it on a written config and wait for its ``node_started``
log event, read its JSON-lines log, kill -9 or stop it, and poll for a condition; and
:func:`simulate_power_cut_loss`, what a power cut adds to a kill -9 on a journalled spool.

The node itself never imports this module.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .spool import Journal

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); ``TimeoutError`` after
    ``timeout`` seconds, naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def simulate_power_cut_loss(spool: Path) -> int:
    """What a power cut after a kill -9 may also take with the page cache, on a journalled spool:
    every instance file whose record is still in a journal segment (not yet checkpointed, so not
    yet fsynced) is deleted, emptied or cut short, in turn. Returns how many recorded files are
    now missing or damaged (what the replay must rewrite; a record whose file the kill left
    unwritten counts too)."""
    recorded = {rel: n for seg in sorted((spool / "journal").glob("seg-*.log"))
                for rel, _, n in Journal.records(seg)}
    for k, (rel, n) in enumerate(sorted(recorded.items())):
        f = spool / rel
        if not f.is_file():
            continue
        if k % 3 == 0:
            f.unlink()
        elif k % 3 == 1:
            f.write_bytes(b"")
        else:
            f.write_bytes(f.read_bytes()[: n // 2])
    return len(recorded)


class NodeProcess:
    """``python -m deploy.node --config CONFIG`` with stdout/stderr appended to ``root/node.log``.

    Subclasses (or callers) write ``self.config`` before :meth:`start`; ``port`` and ``spool``
    are what that config says.
    """

    def __init__(self, root: Path, config: Path, port: int, spool: Path,
                 stop_timeout: float = 30.0) -> None:
        self.root = root
        self.config = config
        self.port = port
        self.spool = spool
        self.log = root / "node.log"
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and return once it logged ``node_started`` (after this start: an earlier
        run's lines in the same log do not count); ``RuntimeError`` if it exits or times out."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "deploy.node", "--config", str(self.config)],
                                         cwd=REPO, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.tail()}")
            with open(self.log, "rb") as f:
                f.seek(offset)
                if b'"event": "node_started"' in f.read():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"node did not start in {timeout} s: {self.tail()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, chars: int = 2000) -> str:
        return self.log_text()[-chars:]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log's JSON records whose ``event`` is ``name``, in order."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if rec.get("event") == name:
                    out.append(rec)
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=self.stop_timeout)

    def stop(self) -> None:
        """SIGTERM (the node's graceful shutdown), SIGKILL if it has not exited in time."""
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of a query on the node's queue database (read while the node runs)."""
        with sqlite3.connect(self.spool / "queue.sqlite", timeout=30) as db:
            return db.execute(sql, args).fetchall()
