"""What every benchmark's JSON result carries, written in one place.

:func:`write_result` adds a ``run`` block (UTC date, the checkout's commit and whether it had
uncommitted changes, Python, platform, CPU count, load average at the end, and that this is a
shared machine) to a result dict, prints it and writes it as indented JSON. Used by
``bench/fsync.py`` and ``bench/ingest.py``. Written by hand: a dozen lines of metadata, no
library needed.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED_MACHINE_NOTE = ("shared development machine: other engineers' tests and CI run on the same "
                       "cores and disk, so absolute figures are noisy; compare receivers within "
                       "one run")


def commit(repo: Path = REPO) -> dict[str, Any]:
    """Short commit id of ``repo`` and whether its work tree differs from it ('' if not git)."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}


def run_metadata(command: list[str] | None = None) -> dict[str, Any]:
    """The ``run`` block: when, which code, on what machine and under what load."""
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **commit(),
            "command": " ".join(command if command is not None else
                                [Path(sys.executable).name, *sys.argv]),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
            "note": SHARED_MACHINE_NOTE}


def write_result(path: Path | None, result: dict[str, Any], *,
                 command: list[str] | None = None, echo: bool = True) -> dict[str, Any]:
    """Add the ``run`` block to ``result``, print it (``echo``) and write it to ``path`` (None:
    print only). Returns the dict written."""
    report = {**result, "run": run_metadata(command)}
    text = json.dumps(report, indent=2) + "\n"
    if echo:
        print(text, end="")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return report
