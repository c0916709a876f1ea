"""Study completion: the quiet period and the trigger rules.

A study is complete when ``study_quiet_seconds`` passed since its last new instance (DICOM has no
"end of study" message; MONAI Deploy Informatics Gateway uses the same rule). Then the trigger
rules decide whether the study holds something the app can analyse (GRE magnitude + phase, or a
QSM or SWI series): if one matches, the study's job is queued for a worker; if none does, the job
is marked 'skipped' with the reason, and the study stays in the spool.

Early start (``early_start``, on by default): a study may be queued before its quiet period ends
when every series received so far that the GRE analysis could use (:func:`completeness.
is_gre_candidate`: an image component, one orientation) is complete by
:func:`completeness.series_completeness`, at least one such series exists, a trigger rule matches,
and no instance arrived for ``early_start_guard_seconds``. Series without an image component
(localisers written as such, T1, reports) never hold it back. Only a study's first run starts early:
a job opened by instances that arrived after an earlier job of the study started (the late-arrival
policy in deploy/node/queue.py) waits for the quiet period, so a trickle of late series makes one
re-run, not one per series. Every queued job logs and keeps (``jobs.start_reason``) why it started.

The clock is injectable (``clock=`` a function returning epoch seconds) so tests drive time.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable

from .completeness import is_gre_candidate, series_completeness
from .config import TriggerRule
from .logs import log_event
from .queue import Queue, SeriesInfo

_MAG = re.compile(r"^(M|MAG|MAGNITUDE|M_[A-Z0-9]+)$")
_PHASE = re.compile(r"^(P|PHA|PHASE|P_[A-Z0-9]+)$")
_REAL = re.compile(r"^(R|REAL|R_[A-Z0-9]+)$")
_IMAG = re.compile(r"^(I|IMAGINARY|I_[A-Z0-9]+)$")

#: GE private "image type" (0043,102F): 0 magnitude, 1 phase, 2 real, 3 imaginary.
_GE_COMPONENT = {0: "magnitude", 1: "phase", 2: "real", 3: "imaginary"}


def image_component(image_type: Iterable[str] | str, ge_private: int | None = None) -> str:
    """Classify an image as 'magnitude', 'phase', 'real', 'imaginary' or '' from its ImageType.

    ``image_type`` is the list of ImageType values (or the values joined with a backslash). Values
    seen in the wild: Siemens ``ORIGINAL\\PRIMARY\\M\\ND`` / ``...\\P\\ND``; Philips ``M_FFE`` /
    ``P_FFE``, ``R_FFE``, ``I_FFE``; others ``MAGNITUDE`` / ``PHASE`` / ``REAL`` / ``IMAGINARY``.
    GE often writes only ``ORIGINAL\\PRIMARY\\OTHER`` and puts the component in (0043,102F), given
    here as ``ge_private``; it wins when present.
    """
    if ge_private is not None and ge_private in _GE_COMPONENT:
        return _GE_COMPONENT[ge_private]
    values = image_type.split("\\") if isinstance(image_type, str) else list(image_type)
    values = [str(v).strip().upper() for v in values]
    for pattern, name in ((_PHASE, "phase"), (_MAG, "magnitude"), (_REAL, "real"), (_IMAG, "imaginary")):
        if any(pattern.match(v) for v in values[2:] or values):
            return name
    return ""


def _considered(rule: TriggerRule, s: SeriesInfo) -> bool:
    if rule.image_type is not None and not rule.image_type.search(s.image_type):
        return False
    if rule.series_description is not None and not rule.series_description.search(s.series_description):
        return False
    return True


def match_trigger(rules: Iterable[TriggerRule], series: list[SeriesInfo]) -> str | None:
    """Name of the first rule the study's series satisfy, or None."""
    for rule in rules:
        considered = [s for s in series if _considered(rule, s)]
        if rule.kind == "series":
            if considered:
                return rule.name
        elif rule.kind == "magnitude_phase":
            parts = {s.component for s in considered}
            if {"magnitude", "phase"} <= parts or {"real", "imaginary"} <= parts:
                return rule.name
    return None


class Scheduler:
    """Closes quiet periods and queues jobs. ``tick()`` does one pass; ``start()`` runs a thread."""

    def __init__(self, queue: Queue, rules: tuple[TriggerRule, ...], quiet_seconds: float,
                 clock: Callable[[], float] = time.time, poll_seconds: float = 0.5,
                 early_start: bool = False, guard_seconds: float = 1.0) -> None:
        self.queue = queue
        self.rules = rules
        self.quiet_seconds = quiet_seconds
        self.early_start = early_start
        self.guard_seconds = guard_seconds
        self.clock = clock
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: job id -> ((study's last_received, n_instances), complete_reason): the study is re-read
        #: only when an instance arrived since (judged once while it waits, not on every tick)
        self._judged: dict[int, tuple[tuple[float, int], str | None]] = {}
        self.wake = threading.Event()  # set when a job was queued (workers wait on it)

    def tick(self) -> list[tuple[int, str]]:
        """One pass: returns (job id, 'queued' | 'skipped') for every job whose quiet period ended."""
        now = self.clock()
        changed = []
        for row in self.queue.receiving_jobs():
            idle = now - row["last_received"]
            if idle < self.quiet_seconds:
                if not self.early_start or idle < self.guard_seconds:
                    continue
                seen = (row["last_received"], row["n_instances"])
                judged = self._judged.get(row["job_id"])
                if judged is None or judged[0] != seen:
                    judged = (seen, self.complete_reason(row["study_uid"], row["job_id"]))
                    self._judged[row["job_id"]] = judged
                start_reason = judged[1]
                if start_reason is None:
                    continue
                trigger = match_trigger(self.rules, self.queue.study_series(row["study_uid"]))
                if trigger is None:  # complete but nothing to analyse: the quiet period decides
                    continue
            else:
                start_reason = f"quiet period elapsed ({self.quiet_seconds:g} s)"
                trigger = match_trigger(self.rules, self.queue.study_series(row["study_uid"]))
            self._judged.pop(row["job_id"], None)
            if self.queue.complete_study(row["job_id"], row["study_uid"], row["last_received"],
                                         trigger, now, start_reason if trigger else None):
                state = "queued" if trigger else "skipped"
                changed.append((row["job_id"], state))
                log_event("study_complete", study_uid=row["study_uid"],
                          calling_aet=row["calling_aet"], job_id=row["job_id"], job_state=state,
                          trigger=trigger, start_reason=start_reason,
                          seconds_since_last_instance=round(idle, 3))
        if any(state == "queued" for _, state in changed):
            self.wake.set()
        return changed

    def complete_reason(self, study_uid: str, job_id: int) -> str | None:
        """'complete: N series, M instances' when the study may start early, else None."""
        by_series: dict[str, list] = {}
        for r in self.queue.completeness_rows(study_uid):
            by_series.setdefault(r["series_uid"], []).append(r)
        candidates = [rows for rows in by_series.values() if is_gre_candidate(rows)]
        if not candidates or not all(series_completeness(rows).complete for rows in candidates):
            return None
        if self.queue.study_ran_before(study_uid, job_id):
            return None
        return (f"complete: {len(candidates)} series, {sum(len(c) for c in candidates)} instances"
                f" ({sum(len(rows) for rows in by_series.values())} in the study)")

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.tick()
            except Exception as exc:  # keep the node alive; the next tick retries
                log_event("scheduler_error", level="error", error=f"{type(exc).__name__}: {exc}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
