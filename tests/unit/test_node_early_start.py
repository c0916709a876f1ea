"""Early start: the completeness rule (deploy/node/completeness.py) on the simulator's real files
(classic and enhanced MR, three vendors) stored through the real C-STORE handler, and the
scheduler starting a study before its quiet period only when every GRE series is complete."""

from __future__ import annotations

import copy
import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest

import deploy.node.logs as node_logs
from core.errors import ConfigError
from core.geometry import Geometry
from deploy.node.completeness import is_gre_candidate, series_completeness
from deploy.node.config import default_triggers, parse_config
from deploy.node.queue import SCHEMA, Queue
from deploy.node.scheduler import Scheduler
from deploy.node.scp import STATUS_SUCCESS, StoreHandler
from deploy.node.service import reconcile
from deploy.node.spool import Spool
from tests.unit.test_node_scp import FakeEvent
from training.sim.dicom_writer import write_study
from training.sim.enhanced_writer import write_enhanced_study
from training.sim.study import Acquisition, SimulatedStudy

SHAPE = (12, 10, 6)
TES_S = [0.004, 0.010, 0.016]


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _study() -> SimulatedStudy:
    geom = Geometry.oblique(SHAPE, (1.0, 1.0, 2.0), tilt_deg=10.0, centre_lps=(0.0, -10.0, 20.0))
    rng = np.random.default_rng(3)
    ne = len(TES_S)
    return SimulatedStudy(
        subject_id="early001", seed=3, geometry=geom, acquisition=Acquisition(list(TES_S)),
        magnitude=rng.uniform(100.0, 1000.0, (ne, *SHAPE)).astype(np.float32),
        phase_rad=rng.uniform(-np.pi, np.pi, (ne, *SHAPE)).astype(np.float32),
        chi_ppm=np.zeros(SHAPE, np.float32), brain_mask=np.ones(SHAPE, bool))


@pytest.fixture(scope="module")
def classic(tmp_path_factory) -> dict[str, list[pydicom.Dataset]]:
    root = tmp_path_factory.mktemp("classic")
    study = _study()
    return {v: [pydicom.dcmread(p) for p in write_study(study, root / v, v)]
            for v in ("siemens", "philips", "ge")}


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory) -> dict[str, list[pydicom.Dataset]]:
    root = tmp_path_factory.mktemp("enhanced")
    study = _study()
    return {v: [pydicom.dcmread(p) for p in write_enhanced_study(study, root / v, v)]
            for v in ("siemens", "philips", "ge")}


def _handler(tmp_path: Path, clock: Clock) -> StoreHandler:
    sp = Spool(tmp_path / "spool")
    return StoreHandler(sp, Queue(sp.db_path), clock=clock)


def _store(handler: StoreHandler, datasets: list[pydicom.Dataset]) -> None:
    for ds in datasets:
        assert handler.handle_store(FakeEvent(ds, ds.SOPInstanceUID)) == STATUS_SUCCESS


def _verdicts(queue: Queue, study_uid: str) -> dict[str, tuple[str, str]]:
    by_series: dict[str, list] = {}
    for r in queue.completeness_rows(study_uid):
        by_series.setdefault(r["series_uid"], []).append(r)
    return {s: (v.state, v.reason) for s, v in
            ((s, series_completeness(rows)) for s, rows in by_series.items())}


def _copy(datasets: list[pydicom.Dataset]) -> list[pydicom.Dataset]:
    return [copy.deepcopy(ds) for ds in datasets]  # setting an attribute changes its element


@pytest.mark.parametrize("vendor,n_series,components", [
    ("siemens", 2, 1), ("philips", 1, 2), ("ge", 1, 2)])
def test_a_whole_classic_series_is_complete(tmp_path, classic, vendor, n_series, components) -> None:
    h = _handler(tmp_path, Clock())
    _store(h, classic[vendor])
    verdicts = _verdicts(h.queue, classic[vendor][0].StudyInstanceUID)
    assert len(verdicts) == n_series
    for state, reason in verdicts.values():
        assert state == "complete"
        assert reason == f"{SHAPE[2]} positions x {len(TES_S)} echoes x {components} components"
    row = h.queue.find_instance(classic[vendor][0].SOPInstanceUID)
    assert (row["echo_train_length"], row["images_in_acquisition"]) == (3, SHAPE[2])


def _slice_index(ds: pydicom.Dataset, positions: list[str]) -> int:
    return positions.index("\\".join(f"{float(v):.2f}" for v in ds.ImagePositionPatient))


@pytest.mark.parametrize("vendor", ["siemens", "philips", "ge"])
def test_missing_slice_missing_echo_and_missing_image_are_incomplete(tmp_path, classic, vendor) -> None:
    files = classic[vendor]
    positions = sorted({"\\".join(f"{float(v):.2f}" for v in ds.ImagePositionPatient) for ds in files})
    last = positions[-1]
    cases = {
        "slice": [ds for ds in files if _slice_index(ds, positions) != positions.index(last)],
        "echo": [ds for ds in files if abs(float(ds.EchoTime) - TES_S[-1] * 1e3) > 1e-6],
        "image": files[1:],
    }
    for i, (name, subset) in enumerate(cases.items()):
        h = _handler(tmp_path / name, Clock())
        _store(h, subset)
        verdicts = _verdicts(h.queue, files[0].StudyInstanceUID)
        states = {state for state, _ in verdicts.values()}
        incomplete = [reason for state, reason in verdicts.values() if state == "incomplete"]
        assert incomplete, (name, verdicts)
        if name == "slice":
            assert any(r == f"{SHAPE[2] - 1} of {SHAPE[2]} slices" for r in incomplete)
            assert states == {"incomplete"}
        elif name == "echo":
            assert any(r == f"2 of {len(TES_S)} echoes" for r in incomplete)
            assert states == {"incomplete"}
        else:
            n = sum(ds.SeriesInstanceUID == files[0].SeriesInstanceUID for ds in files) - 1
            assert incomplete == [f"{n} images for {SHAPE[2]} positions x {len(TES_S)} echoes x "
                                  f"{1 if vendor == 'siemens' else 2} components"]


def test_first_slices_of_a_multi_echo_series_are_not_taken_for_the_whole(tmp_path, classic) -> None:
    """16 of 64 slices x 4 echoes is 64 images: ImagesInAcquisition must count slices, not images.
    Here: 2 of 6 slices x 3 echoes = 6 images = ImagesInAcquisition."""
    files = classic["siemens"]
    positions = sorted({"\\".join(f"{float(v):.2f}" for v in ds.ImagePositionPatient) for ds in files})
    first = [ds for ds in files if _slice_index(ds, positions) < 2]
    h = _handler(tmp_path, Clock())
    _store(h, first)
    for state, reason in _verdicts(h.queue, files[0].StudyInstanceUID).values():
        assert (state, reason) == ("incomplete", f"2 of {SHAPE[2]} slices")


def test_duplicate_and_missing_evidence_are_unknown(tmp_path, classic) -> None:
    files = [ds for ds in classic["siemens"] if "M" in ds.ImageType]  # the magnitude series
    study = files[0].StudyInstanceUID
    # a duplicate: the same slice and echo again under a new SOP Instance UID
    dup = copy.deepcopy(files[0])
    dup.SOPInstanceUID = files[0].SOPInstanceUID + ".9"
    cases: dict[str, tuple[list[pydicom.Dataset], str]] = {
        "duplicate": ([*files, dup], "two images share position, echo time and component")}
    no_etl = _copy(files)
    for ds in no_etl:
        del ds.EchoTrainLength
    cases["no_etl"] = (no_etl, "no EchoTrainLength")
    no_iia = _copy(files)
    for ds in no_iia:
        del ds.ImagesInAcquisition
    cases["no_images_in_acquisition"] = (no_iia, "ImagesInAcquisition missing or not shared")
    thick = _copy(files)  # slices 2 mm apart but 4 mm thick: an interpolated (overlapping) series
    for ds in thick:
        ds.SliceThickness = "4"
    cases["overlap"] = (thick, "slices overlap (2.00 mm apart, 4 mm thick)")
    fewer = _copy(files)  # ImagesInAcquisition below the positions seen
    for ds in fewer:
        ds.ImagesInAcquisition = SHAPE[2] - 1
    cases["fewer"] = (fewer, f"ImagesInAcquisition {SHAPE[2] - 1} < {SHAPE[2]} positions")
    for name, (datasets, reason) in cases.items():
        h = _handler(tmp_path / name, Clock())
        _store(h, datasets)
        assert list(_verdicts(h.queue, study).values()) == [("unknown", reason)], name


@pytest.mark.parametrize("vendor", ["siemens", "philips", "ge"])
def test_a_whole_enhanced_instance_is_complete_by_itself(tmp_path, enhanced, vendor) -> None:
    h = _handler(tmp_path, Clock())
    _store(h, enhanced[vendor][:1])  # one component only: its own series, complete
    (state, reason), = _verdicts(h.queue, enhanced[vendor][0].StudyInstanceUID).values()
    assert (state, reason) == ("complete", f"1 multi-frame instance(s), {SHAPE[2] * 3} frames")
    rows = h.queue.completeness_rows(enhanced[vendor][0].StudyInstanceUID)
    frames = json.loads(rows[0]["frames"])
    assert (frames["n"], frames["etl"], len({f[0] for f in frames["frames"]})) == (18, 3, SHAPE[2])
    assert is_gre_candidate(rows)


def test_enhanced_with_a_repeated_frame_or_no_echo_train_length_is_not_complete(tmp_path, enhanced) -> None:
    src = enhanced["siemens"][0]
    rep = copy.deepcopy(src)
    frames = rep.PerFrameFunctionalGroupsSequence
    frames[1] = copy.deepcopy(frames[0])  # frame 2 says the same position and echo as frame 1
    h = _handler(tmp_path / "repeat", Clock())
    _store(h, [rep])
    assert list(_verdicts(h.queue, src.StudyInstanceUID).values()) == [
        ("unknown", "multi-frame instance: two images share position, echo time and component")]

    no_etl = copy.deepcopy(src)
    del no_etl.SharedFunctionalGroupsSequence[0].MRTimingAndRelatedParametersSequence[0].EchoTrainLength
    h = _handler(tmp_path / "noetl", Clock())
    _store(h, [no_etl])
    assert list(_verdicts(h.queue, src.StudyInstanceUID).values()) == [
        ("unknown", "multi-frame instance: no EchoTrainLength")]


def test_a_multi_plane_localiser_is_no_gre_candidate() -> None:
    def row(orientation: str, component: str = "magnitude") -> dict:
        return {"component": component, "orientation": orientation, "frames": None}
    axial = "1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0.0000"
    sagittal = "0.0000\\1.0000\\0.0000\\0.0000\\0.0000\\-1.0000"
    assert not is_gre_candidate([row(axial), row(sagittal)])
    assert is_gre_candidate([row(axial), row(axial)])
    assert not is_gre_candidate([row(axial, ""), row(axial, "")])  # no image component (a T1, say)


@pytest.fixture
def log_lines(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(node_logs, "_streams", [buf])
    return buf


def _events(buf: io.StringIO, event: str) -> list[dict]:
    return [e for e in map(json.loads, buf.getvalue().splitlines()) if e["event"] == event]


def test_scheduler_starts_a_complete_study_early_and_logs_why(tmp_path, classic, log_lines) -> None:
    clock = Clock()
    h = _handler(tmp_path, clock)
    files = classic["siemens"]
    # a localiser-like series with no image component arrives too: it never holds the study back
    other = copy.deepcopy(files[0])
    other.SeriesInstanceUID, other.SOPInstanceUID = files[0].SeriesInstanceUID + ".7", "1.2.3.99"
    other.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    _store(h, [*files, other])
    sched = Scheduler(h.queue, default_triggers(), quiet_seconds=30, clock=clock,
                      early_start=True, guard_seconds=1.0)
    clock.t += 0.5
    assert sched.tick() == []                # inside the guard
    clock.t += 0.5
    assert sched.tick() == [(1, "queued")]   # 29 s before the quiet period would end
    job = h.queue.job(1)
    expected = f"complete: 2 series, {len(files)} instances ({len(files) + 1} in the study)"
    assert (job["trigger"], job["start_reason"]) == ("gre_magnitude_phase", expected)
    event, = _events(log_lines, "study_complete")
    assert (event["start_reason"], event["seconds_since_last_instance"]) == (expected, 1.0)

    # a late instance while the job runs: kept, a new job, and that re-run waits for quiet
    h.queue.claim_job(clock())
    late = copy.deepcopy(other)
    late.SOPInstanceUID = "1.2.3.100"
    _store(h, [late])
    clock.t += 5
    assert sched.tick() == []
    clock.t += 25
    assert sched.tick() == [(2, "queued")]
    assert h.queue.job(2)["start_reason"] == "quiet period elapsed (30 s)"
    _, rows = h.queue.claim_job(clock())
    assert len(rows) == len(files) + 2


def test_scheduler_waits_for_the_quiet_period_with_a_missing_instance(tmp_path, classic, log_lines) -> None:
    clock = Clock()
    h = _handler(tmp_path, clock)
    _store(h, classic["philips"][:-1])
    sched = Scheduler(h.queue, default_triggers(), quiet_seconds=30, clock=clock,
                      early_start=True, guard_seconds=1.0)
    for step in (1.0, 10.0, 18.9):
        clock.t += step
        assert sched.tick() == []
    clock.t += 0.1
    assert sched.tick() == [(1, "queued")]
    assert h.queue.job(1)["start_reason"] == "quiet period elapsed (30 s)"
    assert _events(log_lines, "study_complete")[0]["start_reason"] == "quiet period elapsed (30 s)"


def test_early_start_off_waits_even_when_complete(tmp_path, classic) -> None:
    clock = Clock()
    h = _handler(tmp_path, clock)
    _store(h, classic["ge"])
    sched = Scheduler(h.queue, default_triggers(), quiet_seconds=30, clock=clock,
                      early_start=False, guard_seconds=1.0)
    clock.t += 29.9
    assert sched.tick() == []
    clock.t += 0.1
    assert sched.tick() == [(1, "queued")]


def test_complete_magnitude_without_phase_does_not_start_early(tmp_path, classic) -> None:
    clock = Clock()
    h = _handler(tmp_path, clock)
    _store(h, [ds for ds in classic["siemens"] if "M" in ds.ImageType])  # complete, no phase yet
    sched = Scheduler(h.queue, default_triggers(), quiet_seconds=30, clock=clock,
                      early_start=True, guard_seconds=1.0)
    clock.t += 5
    assert sched.tick() == []               # no trigger matches yet: the quiet period decides
    clock.t += 25
    assert sched.tick() == [(1, "skipped")]


def test_a_version_1_database_is_migrated_and_keeps_its_rows(tmp_path, classic) -> None:
    path = tmp_path / "spool" / "queue.sqlite"
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path)
    db.executescript(SCHEMA)  # the version-1 tables
    db.execute("INSERT INTO studies VALUES ('1.9', 'SCANNER', 1.0, 1.0, 1, 'receiving', NULL)")
    db.execute("INSERT INTO instances (sop_instance_uid, study_uid, series_uid, path, sha256, size,"
               " received_at, component) VALUES ('1.9.1', '1.9', '1.9.2', 'p', 'x', 1, 1.0, 'phase')")
    db.execute("INSERT INTO jobs (study_uid, state, created_at, updated_at) VALUES ('1.9', 'received', 1, 1)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    q = Queue(path)
    assert q._db.execute("PRAGMA user_version").fetchone()[0] == 2
    old = q.find_instance("1.9.1")
    assert (old["component"], old["echo_time_ms"], old["frames"]) == ("phase", None, None)
    assert series_completeness(q.completeness_rows("1.9")).state == "unknown"  # no evidence: quiet
    q.close()
    clock = Clock()
    h = _handler(tmp_path, clock)  # reopened (already version 2: nothing to migrate)
    _store(h, classic["ge"])
    sched = Scheduler(h.queue, default_triggers(), quiet_seconds=30, clock=clock,
                      early_start=True, guard_seconds=1.0)
    clock.t += 1
    study = classic["ge"][0].StudyInstanceUID
    assert [h.queue.job(j)["study_uid"] for j, s in sched.tick() if s == "queued"] == [study]


def test_config_early_start_keys(tmp_path) -> None:
    base = {"ae_title": "N", "port": 11112, "spool": str(tmp_path)}
    cfg = parse_config(base)
    assert (cfg.early_start, cfg.early_start_guard_seconds) == (True, 1.0)
    cfg = parse_config({**base, "early_start": False, "early_start_guard_seconds": 2.5})
    assert (cfg.early_start, cfg.early_start_guard_seconds) == (False, 2.5)
    with pytest.raises(ConfigError, match=r"^early_start: expected true or false, got 'yes'$"):
        parse_config({**base, "early_start": "yes"})
    with pytest.raises(ConfigError, match=r"^early_start_guard_seconds: must be >= 0.0, got -1$"):
        parse_config({**base, "early_start_guard_seconds": -1})


def test_the_missing_instance_arriving_later_starts_the_study_early(tmp_path, classic) -> None:
    clock = Clock()
    h = _handler(tmp_path, clock)
    files = classic["philips"]
    _store(h, files[:-1])
    sched = Scheduler(h.queue, default_triggers(), quiet_seconds=30, clock=clock,
                      early_start=True, guard_seconds=1.0)
    clock.t += 5
    assert sched.tick() == []               # judged incomplete
    _store(h, files[-1:])
    clock.t += 0.5
    assert sched.tick() == []               # inside the guard
    clock.t += 0.5
    assert sched.tick() == [(1, "queued")]  # judged again: complete
    assert h.queue.job(1)["start_reason"] == (
        f"complete: 1 series, {len(files)} instances ({len(files)} in the study)")


def test_reconcile_records_the_evidence_of_a_recovered_file(tmp_path, classic) -> None:
    sp = Spool(tmp_path / "spool")
    q = Queue(sp.db_path)
    ds = classic["siemens"][0]
    path = sp.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    assert reconcile(sp, q, clock=Clock()) == 1
    row = q.find_instance(ds.SOPInstanceUID)
    assert (row["echo_time_ms"], row["echo_train_length"], row["images_in_acquisition"]) == (
        round(float(ds.EchoTime), 3), 3, SHAPE[2])
    assert row["position"] == "\\".join(f"{float(v):.2f}" for v in ds.ImagePositionPatient)
