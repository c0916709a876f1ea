"""Soak test of the DICOM node: kill -9 mid-push, restart, no acknowledged instance lost.

Runs 3 cycles of ``bench.reliability.run_cycles`` (the benchmark's own code path) on a simulated
study (``training.simulate --voxel-mm 3 3 3``, 472 instances): start the node, push with storescu,
kill -9 it soon after the first acknowledgement, restart, check every acknowledged instance is in
the spool byte-identical and in the queue, push again and check the study completes and its job
finishes (no-op app). Twice: with ``ingest_journal`` off (fsync per instance) and on, where each
kill is followed by a simulated power cut (every instance file the journal still holds is
deleted, emptied or cut short) that the restart's replay must repair.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.reliability import run_cycles, simulate_study

pytestmark = [pytest.mark.dicom_tools, pytest.mark.slow]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return simulate_study(tmp_path_factory.mktemp("sim"))


@pytest.mark.parametrize("journal", [False, True], ids=["fsync_per_instance", "journal_power_cut"])
def test_kill9_cycles_lose_no_acknowledged_instance(study: Path, tmp_path: Path,
                                                    journal: bool) -> None:
    if shutil.which("storescu") is None:
        pytest.skip("storescu (DCMTK) is not installed")
    # kill 0.05-0.5 s after the first Success: well inside a ~2-5 s push of 472 instances
    res = run_cycles(study, cycles=3, seed=7, kill_delay_s=(0.05, 0.5), work=tmp_path,
                     ingest_journal=journal, power_cut=journal)
    n = res["study"]["instances"]
    assert res["ingest_journal"] is journal
    if journal:  # the power cut took files; the replay put exactly those back
        assert res["power_cut_files_lost"] > 0
        assert res["journal_files_rewritten"] == res["power_cut_files_lost"]
    else:
        assert res["power_cut_files_lost"] == res["journal_files_rewritten"] == 0
    assert n == 472
    assert res["cycles_run"] == 3
    assert res["instances_lost"] == 0, [c["lost_sop_uids"][:5] for c in res["cycles"]]
    assert res["instances_altered"] == 0 and res["instances_missing_from_queue"] == 0
    assert res["duplicates"] == 0
    mid = [c for c in res["cycles"] if c["killed_mid_push"]]
    assert mid, "no cycle killed the node mid-push"
    assert all(0 < c["instances_acknowledged"] < n for c in mid)
    assert res["instances_acknowledged_before_kill"] > 0
    assert res["cycles_complete_after_repush"] == 3
    assert [c["job_state"] for c in res["cycles"]] == ["done"] * 3
    assert res["cycles_newest_job_done_with_whole_study"] == 3 and res["jobs_failed"] == 0
