"""``python -m app --job-from-stdin``: the node's prestarted app (deploy/node/worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def _run(stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "--job-from-stdin", "--device", "cpu", *extra],
                          cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300)


def test_end_of_file_before_a_job_exits_0_and_writes_nothing():
    proc = _run("")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_bad_job_lines_exit_2_with_one_line(tmp_path):
    for line, words in (("not json\n", "is not"), (json.dumps({"input": "x"}) + "\n", "is not"),
                        (json.dumps({"input": str(tmp_path / "missing"), "output": str(tmp_path / "o")}) + "\n",
                         "input folder does not exist")):
        proc = _run(line)
        assert proc.returncode == 2, (line, proc.stderr)
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()
