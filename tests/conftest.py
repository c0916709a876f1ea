"""Shared test fixtures.

External DICOM tools (dicom3tools, DCMTK, Orthanc) are installed by ``.ci/run``. Locally a test that
needs a missing tool is skipped with the reason; in CI (``CI`` set) a missing tool fails the test,
so a broken install step can never turn into a silently green run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def require_tool(name: str) -> str:
    """Path of an external executable, or skip (locally) / fail (CI) when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    msg = f"{name} is not installed (Debian packages: dicom3tools, dcmtk, orthanc, dcm2niix; see .ci/run)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def dciodvfy_errors(path: Path) -> list[str]:
    """Lines in which dciodvfy reports an error for one file (warnings are not errors)."""
    exe = require_tool("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def run_app(input_dir: Path, output_dir: Path, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python -m app`` as a user would, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "app", "-i", str(input_dir), "-o", str(output_dir), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def tool():
    return require_tool
