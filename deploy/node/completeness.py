"""Is a series complete? What each instance says about its series, and the rule that reads it.

DICOM has no "end of series" message, so the node waits ``study_quiet_seconds`` after the last
instance (deploy/node/scheduler.py). A multi-echo GRE series often says how big it is, though, and
then the node may start before the quiet period ends (``early_start``). Written by hand: no DICOM
library decides completeness; the attributes and what vendors put in them are below.

What is recorded per instance at C-STORE time (:func:`completeness_fields`):

* ``position`` ImagePositionPatient, ``orientation`` ImageOrientationPatient,
  ``slice_thickness_mm`` SliceThickness;
* ``echo_time_ms`` EchoTime, ``echo_number`` EchoNumbers (first value);
* ``echo_train_length`` EchoTrainLength (0018,0091): the number of echoes of a multi-echo GRE;
* ``images_in_acquisition`` ImagesInAcquisition (0020,1002), ``instance_number`` InstanceNumber;
* the component (magnitude / phase / real / imaginary) is the queue's existing ``component``;
* ``frames`` (enhanced multi-frame only): JSON with NumberOfFrames, EchoTrainLength and one
  ``[position, echo time, component]`` per frame from the per-frame / shared functional groups.

The rule (:func:`series_completeness`), conservative: anything missing or not as expected says
``unknown`` and the quiet period decides.

Classic (one image per instance) series, with P distinct positions, E distinct echo times and C
distinct components:

1. every instance has a position and an echo time, and one orientation is shared by all (a
   multi-plane localiser is no GRE volume: :func:`is_gre_candidate` says so);
2. no two instances share (position, echo time, component) -- a duplicate means two acquisitions
   in one series or a re-send with a new UID: unknown;
3. the grid is full: P x E x C == number of instances;
4. EchoTrainLength is present, the same on every instance, and == E (fewer echoes seen:
   incomplete; none written: unknown). If EchoNumbers are written, they number E echoes too;
5. ImagesInAcquisition is present, the same on every instance, and == P. What vendors put there:
   GE writes the number of slice locations (dcm2niix takes it as the slice count for GE, and
   notes that a ZIP x2 interpolated series has 72 there for 144 reconstructed slices); other
   readers (NiDB) also take it as the slice count. What Siemens and Philips classic images hold
   there was not checked against real files here: absent means unknown (the quiet period), and a
   total-image count exceeds P (unless there is one echo and one component, where both readings
   agree), so it also falls back to the quiet period.
   Only ``== P`` is accepted: reading it as the total count (P x E x C) would call 16 of 64
   slices x 4 echoes complete, because 16 x 4 == 64. A value above P means slices are missing;
   a value below P (interpolation) is unknown;
6. slices do not overlap: the smallest gap between positions along the slice normal is at least
   0.99 x SliceThickness when it is written (overlapping slices are interpolated, where
   ImagesInAcquisition counts acquired, not reconstructed, slices: unknown);
7. InstanceNumbers, when all present and distinct, do not exceed the number of instances
   (a higher one means a lower one is missing).

An enhanced multi-frame instance arrives whole, so it is complete by itself when its frames form
a full grid with no duplicate and E == EchoTrainLength (rules 2-4 over its frames, P x E x C ==
NumberOfFrames). A series of several multi-frame instances is complete when every one is;
a concatenation (ConcatenationUID: one image split over instances) is unknown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import tag_for_keyword

#: Positions closer than this (mm) are the same position.
POSITION_DECIMALS = 2
#: Echo times closer than this (ms) are the same echo.
ECHO_DECIMALS = 3

#: Columns added to the queue's ``instances`` table (name, SQL type).
COLUMNS: tuple[tuple[str, str], ...] = (
    ("position", "TEXT"),
    ("orientation", "TEXT"),
    ("slice_thickness_mm", "REAL"),
    ("echo_time_ms", "REAL"),
    ("echo_number", "INTEGER"),
    ("echo_train_length", "INTEGER"),
    ("images_in_acquisition", "INTEGER"),
    ("instance_number", "INTEGER"),
    ("frames", "TEXT"),
)

COMPONENTS = {"MAGNITUDE": "magnitude", "PHASE": "phase", "REAL": "real", "IMAGINARY": "imaginary"}


@dataclass(frozen=True)
class Verdict:
    """``state`` is 'complete', 'incomplete' or 'unknown'; ``reason`` says why in a few words."""

    state: str
    reason: str

    @property
    def complete(self) -> bool:
        return self.state == "complete"


def _number(value: Any) -> float | None:
    try:
        if value is None or value == "":
            return None
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = value[0] if len(value) else None
            if value is None:
                return None
        x = float(value)
        return x if math.isfinite(x) else None
    except (TypeError, ValueError, IndexError):
        return None


def _integer(value: Any) -> int | None:
    x = _number(value)
    return int(x) if x is not None and x == int(x) else None


def _triplet(value: Any, n: int = 3) -> list[float] | None:
    if isinstance(value, (str, bytes)):
        value = [value]
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(math.isfinite(v) for v in values) else None


def _text_position(value: Any) -> str | None:
    xyz = _triplet(value)
    return None if xyz is None else "\\".join(f"{v:.{POSITION_DECIMALS}f}" for v in xyz)


_TEXT_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "EchoTime",
                  "EchoNumbers", "EchoTrainLength", "ImagesInAcquisition", "InstanceNumber",
                  "NumberOfFrames", "ComplexImageComponent")
_TAGS = {kw: tag_for_keyword(kw) for kw in _TEXT_KEYWORDS}


def _text(ds: Any, keyword: str) -> Any:
    """A DS / IS / CS value of ``ds``: one string, a list of strings, or pydicom's converted value.

    An element still as received (a raw element, what the C-STORE path has) is split here
    instead of converted by pydicom, whose conversion and validation cost about 0.05 ms per
    element, ten elements per instance.
    """
    elem = ds.get_item(_TAGS[keyword])
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        parts = [p.strip(" \x00") for p in value.decode("latin-1").split("\\")]
        return parts if len(parts) > 1 else parts[0]
    return value


def _item(ds: Any, keyword: str) -> Any:
    """First item of sequence ``keyword`` in ``ds`` or None."""
    seq = ds.get(keyword) if ds is not None else None
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _group_value(frame: Any, shared: Any, sequence: str, keyword: str) -> Any:
    """A functional group attribute: per-frame first, then shared."""
    for groups in (frame, shared):
        item = _item(groups, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


def _enhanced_frames(ds: Any, n_frames: int, component: str) -> dict[str, Any]:
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    etl = _integer(_group_value(None, shared, "MRTimingAndRelatedParametersSequence",
                                "EchoTrainLength"))
    if etl is None:
        etl = _integer(ds.get("EchoTrainLength"))
    frames = []
    for i in range(min(len(per_frame), n_frames)):
        f = per_frame[i]
        pos = _text_position(_group_value(f, shared, "PlanePositionSequence", "ImagePositionPatient"))
        te = _number(_group_value(f, shared, "MREchoSequence", "EffectiveEchoTime"))
        cic = _group_value(f, shared, "MRImageFrameTypeSequence", "ComplexImageComponent")
        comp = COMPONENTS.get(str(cic or "").upper(), component)
        frames.append([pos, None if te is None else round(te, ECHO_DECIMALS), comp])
    return {"n": n_frames, "etl": etl, "frames": frames,
            "concatenation": "ConcatenationUID" in ds}


def completeness_fields(ds: Any, component: str) -> dict[str, Any]:
    """What ``ds`` (a pydicom Dataset, pixels not needed) says about its series' completeness.

    ``component`` is the image component already derived from ImageType / GE private tag; a
    ComplexImageComponent (0008,9208) of MAGNITUDE / PHASE / REAL / IMAGINARY takes precedence.
    Never raises: an attribute that cannot be read is left out (None).
    """
    try:
        cic = COMPONENTS.get(str(_text(ds, "ComplexImageComponent") or "").upper())
        component = cic or component
        out: dict[str, Any] = {
            "position": _text_position(_text(ds, "ImagePositionPatient")),
            "orientation": None,
            "slice_thickness_mm": _number(_text(ds, "SliceThickness")),
            "echo_time_ms": _number(_text(ds, "EchoTime")),
            "echo_number": _integer(_text(ds, "EchoNumbers")),
            "echo_train_length": _integer(_text(ds, "EchoTrainLength")),
            "images_in_acquisition": _integer(_text(ds, "ImagesInAcquisition")),
            "instance_number": _integer(_text(ds, "InstanceNumber")),
            "frames": None,
        }
        iop = _triplet(_text(ds, "ImageOrientationPatient"), 6)
        if iop is not None:
            out["orientation"] = "\\".join(f"{v:.4f}" for v in iop)
        if out["echo_time_ms"] is not None:
            out["echo_time_ms"] = round(out["echo_time_ms"], ECHO_DECIMALS)
        n_frames = _integer(_text(ds, "NumberOfFrames"))
        if n_frames is not None and n_frames >= 1 and "PerFrameFunctionalGroupsSequence" in ds:
            frames = _enhanced_frames(ds, n_frames, component)
            out["frames"] = json.dumps(frames, separators=(",", ":"))
            out["echo_train_length"] = frames["etl"]
        return out
    except Exception:  # a hostile or odd data set: no evidence, the quiet period decides
        return {name: None for name, _ in COLUMNS}


def _grid(keys: list[tuple[Any, Any, Any]], etl: int | None) -> Verdict:
    """Rules 1-4 over (position, echo time, component) keys."""
    if any(p is None or te is None for p, te, _ in keys):
        return Verdict("unknown", "an image without position or echo time")
    if len(set(keys)) != len(keys):
        return Verdict("unknown", "two images share position, echo time and component")
    n_p = len({k[0] for k in keys})
    n_e = len({k[1] for k in keys})
    n_c = len({k[2] for k in keys})
    if n_p * n_e * n_c != len(keys):
        return Verdict("incomplete", f"{len(keys)} images for {n_p} positions x {n_e} echoes x "
                                     f"{n_c} components")
    if etl is None:
        return Verdict("unknown", "no EchoTrainLength")
    if n_e < etl:
        return Verdict("incomplete", f"{n_e} of {etl} echoes")
    if n_e > etl:
        return Verdict("unknown", f"{n_e} echo times but EchoTrainLength {etl}")
    return Verdict("complete", f"{n_p} positions x {n_e} echoes x {n_c} components")


def _one(rows: list[Mapping[str, Any]], name: str) -> tuple[bool, Any]:
    values = {r[name] for r in rows}
    return len(values) == 1, next(iter(values)) if len(values) == 1 else None


def _normal(orientation: str) -> tuple[float, float, float] | None:
    v = [float(x) for x in orientation.split("\\")]
    r, c = v[:3], v[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(x * x for x in n))
    return None if norm < 1e-6 else (n[0] / norm, n[1] / norm, n[2] / norm)


def _enhanced(rows: list[Mapping[str, Any]]) -> Verdict:
    for r in rows:
        if not r["frames"]:
            return Verdict("unknown", "a series mixing multi-frame and single-frame instances")
        f = json.loads(r["frames"])
        if f.get("concatenation"):
            return Verdict("unknown", "a concatenation (one image split over instances)")
        frames = [tuple(x) for x in f["frames"]]
        if len(frames) != f["n"]:
            return Verdict("unknown", "per-frame groups do not match NumberOfFrames")
        verdict = _grid(frames, f["etl"])
        if not verdict.complete:
            return Verdict(verdict.state, f"multi-frame instance: {verdict.reason}")
    return Verdict("complete", f"{len(rows)} multi-frame instance(s), "
                               f"{sum(json.loads(r['frames'])['n'] for r in rows)} frames")


def series_completeness(rows: Iterable[Mapping[str, Any]]) -> Verdict:
    """The rule of the module docstring over one series' instance rows (queue columns)."""
    rows = list(rows)
    if not rows:
        return Verdict("unknown", "no instance")
    if any(r["frames"] for r in rows):
        return _enhanced(rows)
    same, orientation = _one(rows, "orientation")
    if not same or orientation is None:
        return Verdict("unknown", "orientation missing or not shared")
    verdict = _grid([(r["position"], r["echo_time_ms"], r["component"] or "") for r in rows],
                    _one(rows, "echo_train_length")[1])
    if not verdict.complete:
        return verdict
    numbers = {r["echo_number"] for r in rows}
    n_e = len({r["echo_time_ms"] for r in rows})
    if None not in numbers and len(numbers) != n_e:
        return Verdict("unknown", f"{len(numbers)} EchoNumbers for {n_e} echo times")
    same, n_images = _one(rows, "images_in_acquisition")
    if not same or n_images is None:
        return Verdict("unknown", "ImagesInAcquisition missing or not shared")
    positions = {r["position"] for r in rows}
    if n_images > len(positions):
        return Verdict("incomplete", f"{len(positions)} of {n_images} slices")
    if n_images < len(positions):
        return Verdict("unknown", f"ImagesInAcquisition {n_images} < {len(positions)} positions")
    same, thickness = _one(rows, "slice_thickness_mm")
    normal = _normal(orientation)
    if normal is None:
        return Verdict("unknown", "orientation is degenerate")
    if same and thickness and len(positions) > 1:
        heights = sorted(sum(float(x) * n for x, n in zip(p.split("\\"), normal)) for p in positions)
        gap = min(b - a for a, b in zip(heights, heights[1:]))
        if gap < 0.99 * thickness:
            return Verdict("unknown", f"slices overlap ({gap:.2f} mm apart, {thickness:g} mm thick)")
    numbers = [r["instance_number"] for r in rows]
    if None not in numbers and len(set(numbers)) == len(numbers) and max(numbers) > len(rows):
        return Verdict("incomplete", f"InstanceNumber {max(numbers)} but {len(rows)} instances")
    return verdict


def is_gre_candidate(rows: Iterable[Mapping[str, Any]]) -> bool:
    """A series the GRE analysis may use: it has an image component (magnitude / phase / real /
    imaginary) and is not a multi-plane localiser (several orientations)."""
    rows = list(rows)
    if not any(r["component"] for r in rows):
        return False
    if any(r["frames"] for r in rows):
        return True
    return len({r["orientation"] for r in rows if r["orientation"] is not None}) <= 1
