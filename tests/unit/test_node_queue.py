"""Durable queue: state transitions survive closing and reopening the database; the quiet period
and trigger rules, driven by an injectable clock; the late-arrival policy; crash recovery."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deploy.node.config import TriggerRule, default_triggers
from deploy.node.queue import InstanceRecord, Queue, ResultFile, SeriesInfo
from deploy.node.scheduler import Scheduler, image_component, match_trigger

STUDY = "1.2.3"


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def inst(sop: str, component: str = "magnitude", study: str = STUDY, sha: str | None = None,
         series: str | None = None) -> InstanceRecord:
    image_type = {"magnitude": "ORIGINAL\\PRIMARY\\M\\ND", "phase": "ORIGINAL\\PRIMARY\\P\\ND"}.get(
        component, "ORIGINAL\\PRIMARY\\OTHER")
    series = series or (study + (".10" if component == "magnitude" else ".20"))
    return InstanceRecord(sop, study, series, "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.2.1",
                          f"instances/{study}/{series}/{sop}.dcm", sha or f"sha-{sop}", 100, "SCANNER",
                          "MR", image_type, "gre", component)


def reopen(q: Queue) -> Queue:
    q.close()
    return Queue(q.path)


def job_states(q: Queue) -> list[tuple[int, str]]:
    return [(j["id"], j["state"]) for j in q.snapshot()["jobs"]]


def test_wal_and_full_sync_are_set(tmp_path: Path) -> None:
    q = Queue(tmp_path / "q.sqlite")
    assert q._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert q._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert q._db.execute("PRAGMA user_version").fetchone()[0] == 2


def test_full_lifecycle_survives_reopening_at_every_step(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    assert q.record_instance(inst("1.2.3.1", "magnitude"), clock()) == "new"
    assert q.record_instance(inst("1.2.3.2", "phase"), clock()) == "new"
    q = reopen(q)
    assert job_states(q) == [(1, "received")]
    study = q.snapshot()["studies"][0]
    assert (study["state"], study["n_instances"], study["calling_aet"]) == ("receiving", 2, "SCANNER")

    sched = Scheduler(q, default_triggers(), quiet_seconds=30, clock=clock)
    clock.t += 29.9
    assert sched.tick() == []                       # still inside the quiet period
    clock.t += 0.2
    assert sched.tick() == [(1, "queued")]
    q = reopen(q)
    job = q.snapshot()["jobs"][0]
    assert (job["state"], job["trigger"]) == ("queued", "gre_magnitude_phase")
    assert q.snapshot()["studies"][0]["state"] == "complete"

    claimed = q.claim_job(clock())
    assert claimed is not None
    job, rows = claimed
    assert (job["state"], job["attempts"], job["max_seq"], len(rows)) == ("running", 1, 2, 2)
    assert q.claim_job(clock()) is None             # nothing else queued
    q = reopen(q)
    # kill -9 while running: recovery puts it back in the queue, attempts kept
    assert q.recover(max_attempts=3, now=clock()) == [(1, "queued", None, 1)]
    q = reopen(q)
    job = q.snapshot()["jobs"][0]
    assert (job["state"], job["attempts"], job["reason"]) == (
        "queued", 1, "node restarted while the app was running")

    job, rows = q.claim_job(clock())
    assert job["attempts"] == 2
    results = [ResultFile("jobs/1/output/sr.dcm", "9.1", "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.1.2.1"),
               ResultFile("jobs/1/output/seg.dcm", "9.2", "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.1.2.1")]
    q.finish_job(1, results, ["PACS@h:104", "ARCHIVE@h:105"], clock())
    q = reopen(q)
    assert job_states(q) == [(1, "done")]
    due = q.due_deliveries(clock())
    assert len(due) == 4 and {d["state"] for d in due} == {"pending"}
    assert {d["study_uid"] for d in due} == {STUDY}

    # one failure with back-off: not due again until its time
    first = due[0]
    assert q.delivery_failed(first["id"], "association rejected", clock() + 5.0, clock()) == 1
    q = reopen(q)
    assert first["id"] not in [d["id"] for d in q.due_deliveries(clock())]
    assert q.next_delivery_time() == pytest.approx(clock())  # the other three are due now
    for d in q.due_deliveries(clock()):
        q.delivery_succeeded(d["id"], clock())
    q = reopen(q)
    assert job_states(q) == [(1, "done")]            # one delivery still pending
    clock.t += 5.0
    (again,) = q.due_deliveries(clock())
    assert (again["id"], again["attempts"], again["last_error"]) == (first["id"], 1, "association rejected")
    q.delivery_succeeded(again["id"], clock())
    q = reopen(q)
    assert job_states(q) == [(1, "delivered")]
    final = [(d["result_path"], d["destination"], d["state"], d["attempts"])
             for d in q.snapshot()["deliveries"]]
    assert len(final) == 4 and sorted(a for *_, a in final) == [1, 1, 1, 2]
    assert {f[2] for f in final} == {"delivered"}
    q.close()


def test_duplicate_same_bytes_is_not_recorded_twice_and_does_not_reopen(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    q.record_instance(inst("1.2.3.1"), clock())
    clock.t += 100
    assert q.record_instance(inst("1.2.3.1"), clock()) == "duplicate"
    study = q.snapshot()["studies"][0]
    assert (study["n_instances"], study["last_received"]) == (1, 1000.0)
    # same UID, different bytes: replaces the record, counts as a new arrival
    assert q.record_instance(inst("1.2.3.1", sha="other"), clock()) == "replaced"
    study = q.snapshot()["studies"][0]
    assert (study["n_instances"], study["last_received"]) == (1, 1100.0)
    assert q.find_instance("1.2.3.1")["sha256"] == "other"


def test_late_instances_reopen_a_queued_job_and_create_a_new_job_after_start(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    sched = Scheduler(q, default_triggers(), quiet_seconds=10, clock=clock)
    q.record_instance(inst("1.2.3.1", "magnitude"), clock())
    q.record_instance(inst("1.2.3.2", "phase"), clock())
    clock.t += 10
    assert sched.tick() == [(1, "queued")]
    # arrives before a worker took the job: same job, back to 'received', quiet period restarts
    q.record_instance(inst("1.2.3.3", "phase"), clock())
    assert job_states(q) == [(1, "received")]
    clock.t += 9
    assert sched.tick() == []
    clock.t += 1
    assert sched.tick() == [(1, "queued")]
    job, rows = q.claim_job(clock())
    assert [r["sop_instance_uid"] for r in rows] == ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    # arrives while the job runs: a new job for the whole study
    q.record_instance(inst("1.2.3.4", "magnitude"), clock())
    assert job_states(q) == [(1, "running"), (2, "received")]
    clock.t += 10
    assert sched.tick() == [(2, "queued")]
    job2, rows2 = q.claim_job(clock())
    assert job2["id"] == 2 and len(rows2) == 4 and job2["max_seq"] > job["max_seq"]


def test_study_without_usable_series_is_skipped_with_reason(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    sched = Scheduler(q, default_triggers(), quiet_seconds=5, clock=clock)
    q.record_instance(inst("1.2.3.1", "magnitude"), clock())   # magnitude only: not enough
    clock.t += 5
    assert sched.tick() == [(1, "skipped")]
    snap = q.snapshot()
    assert snap["studies"][0]["state"] == "ignored"
    assert snap["jobs"][0]["reason"] == "no series in the study matches the trigger rules"
    # the phase arrives later: a new job, and now the study qualifies
    q.record_instance(inst("1.2.3.2", "phase"), clock())
    clock.t += 5
    assert sched.tick() == [(2, "queued")]


def test_complete_study_refuses_if_an_instance_arrived_meanwhile(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    q.record_instance(inst("1.2.3.1"), clock())
    seen = q.receiving_jobs()[0]["last_received"]
    clock.t += 1
    q.record_instance(inst("1.2.3.2", "phase"), clock())
    assert q.complete_study(1, STUDY, seen, "gre", clock()) is False
    assert job_states(q) == [(1, "received")]


def test_failed_app_is_retried_until_max_attempts(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    q.record_instance(inst("1.2.3.1"), clock())
    q.record_instance(inst("1.2.3.2", "phase"), clock())
    clock.t += 1
    Scheduler(q, default_triggers(), 1, clock).tick()
    q.claim_job(clock())
    assert q.fail_job(1, "app exited with code 3", max_attempts=2, now=clock()) == "queued"
    q.claim_job(clock())
    assert q.fail_job(1, "app exited with code 3", max_attempts=2, now=clock()) == "failed"
    q = reopen(q)
    job = q.snapshot()["jobs"][0]
    assert (job["state"], job["attempts"], job["reason"]) == ("failed", 2, "app exited with code 3")
    # recovery does not resurrect a running job that is out of attempts
    q.record_instance(inst("1.2.3.3"), clock())
    clock.t += 1
    Scheduler(q, default_triggers(), 1, clock).tick()
    q.claim_job(clock())
    q.set_app_pid(2, 4242)
    assert q.recover(max_attempts=1, now=clock()) == [(2, "failed", 4242, 1)]


def test_delivery_gives_up_when_told_and_job_is_failed(tmp_path: Path) -> None:
    clock = Clock()
    q = Queue(tmp_path / "q.sqlite")
    q.record_instance(inst("1.2.3.1"), clock())
    q.record_instance(inst("1.2.3.2", "phase"), clock())
    clock.t += 1
    Scheduler(q, default_triggers(), 1, clock).tick()
    q.claim_job(clock())
    q.finish_job(1, [ResultFile("r.dcm", "9.1", "1.2", "1.2.840.10008.1.2.1")], ["PACS@h:1"], clock())
    (d,) = q.due_deliveries(clock())
    q.delivery_failed(d["id"], "status 0xA700", None, clock())
    snap = q.snapshot()
    assert snap["deliveries"][0]["state"] == "failed"
    assert (snap["jobs"][0]["state"], snap["jobs"][0]["reason"]) == (
        "failed", "1 deliveries gave up (see status)")


@pytest.mark.parametrize("image_type, ge, expected", [
    ("ORIGINAL\\PRIMARY\\M\\ND", None, "magnitude"),
    ("ORIGINAL\\PRIMARY\\P\\ND", None, "phase"),
    ("ORIGINAL\\PRIMARY\\M_FFE\\M\\FFE", None, "magnitude"),
    ("ORIGINAL\\PRIMARY\\P_FFE\\P\\FFE", None, "phase"),
    ("ORIGINAL\\PRIMARY\\PHASE MAP\\P", None, "phase"),
    ("ORIGINAL\\PRIMARY\\REAL", None, "real"),
    ("ORIGINAL\\PRIMARY\\IMAGINARY", None, "imaginary"),
    ("ORIGINAL\\PRIMARY\\OTHER", 1, "phase"),
    ("ORIGINAL\\PRIMARY\\OTHER", 3, "imaginary"),
    ("ORIGINAL\\PRIMARY\\OTHER", None, ""),
    ("DERIVED\\SECONDARY\\QSM", None, ""),
])
def test_image_component(image_type: str, ge: int | None, expected: str) -> None:
    assert image_component(image_type, ge) == expected


def test_trigger_rules() -> None:
    rules = default_triggers()

    def s(desc: str = "gre", it: str = "ORIGINAL\\PRIMARY\\M\\ND", comp: str = "magnitude") -> SeriesInfo:
        return SeriesInfo("1.2", it, desc, comp)

    assert match_trigger(rules, [s(), s(comp="phase", it="ORIGINAL\\PRIMARY\\P\\ND")]) == "gre_magnitude_phase"
    assert match_trigger(rules, [s(comp="real"), s(comp="imaginary")]) == "gre_magnitude_phase"
    assert match_trigger(rules, [s()]) is None
    assert match_trigger(rules, [s("T1 MPRAGE", comp="")]) is None
    assert match_trigger(rules, [s("QSM_map", comp="")]) is None  # \b needs a word boundary
    assert match_trigger(rules, [s("Ax QSM", it="DERIVED\\SECONDARY\\QSM", comp="")]) == "qsm"
    assert match_trigger(rules, [s("SWI_Images", it="DERIVED\\PRIMARY\\M\\SWI")]) == "swi"
    assert match_trigger(rules, [s("ax swi minIP", comp="")]) == "swi_description"
    only_gre = (TriggerRule("gre_only", "magnitude_phase",
                            series_description=re.compile(r"(?i)gre")),)
    assert match_trigger(only_gre, [s("gre"), s("swi", comp="phase")]) is None
    assert match_trigger(only_gre, [s("gre"), s("gre echo", comp="phase")]) == "gre_only"
