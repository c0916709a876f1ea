"""Stable DICOM UIDs for the objects the product sends back to PACS.

Policy (DESIGN.md: results are delivered at least once and re-sent results must not duplicate):

* Every UID we create is a *name-based* UID: ``2.25.<decimal of a version-5 (SHA-1) UUID>`` over
  the ordered parts that identify the object, the form PS3.5 section B.2 allows under the
  ``2.25`` root. The same parts always give the same UID; a PACS receiving the same result twice
  therefore sees the same Series and SOP Instance UIDs and replaces (or ignores) rather than
  piling up a duplicate series.
* A result series is identified by (StudyInstanceUID of the source study, SeriesInstanceUID of
  the source series it was computed from, kind of result such as ``"QSM STAR-QSM"`` or ``"SEG"``,
  algorithm version). Re-processing the same study with the same software gives the same series;
  a new algorithm version (or another method/kind) gives a *new* series, so results of different
  versions never overwrite each other.
* An instance is identified by its series UID and its index in the series (0-based slice number,
  or 0 for single-instance objects such as SEG and SR).
* We never rely on ``pydicom.uid.generate_uid(entropy_srcs=...)``: under the ``2.25`` root
  (``prefix=None``) it ignores the entropy sources and returns a random UID.

The namespace UUID below is fixed forever: changing it would change every UID the product has
ever sent.
"""

from __future__ import annotations

import re
import uuid

#: Namespace of every name-based UID the product creates. Never change it.
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/cmb-node/cmb-qsm/uids")

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_SEP = "\x1f"  # ASCII unit separator: ("a|b", "c") and ("a", "b|c") must not collide


def is_valid_uid(uid: str) -> bool:
    """Whether ``uid`` follows the PS3.5 section 9.1 grammar (digits and dots, no leading zeros, <= 64)."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


def derived_uid(*parts: str) -> str:
    """A ``2.25.<int>`` UID that depends only on the ordered ``parts``.

    The integer is a version-5 UUID (128 bits, at most 39 decimal digits), so the UID is at most
    44 characters. Parts are joined with a separator that cannot occur in DICOM UIDs or text
    values, so different splits of the same characters give different UIDs.

    Raises:
        ValueError: when no part is given (an empty name would make every caller collide).
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    name = _SEP.join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


def result_series_uid(
    study_instance_uid: str, source_series_uid: str, kind: str, algorithm_version: str
) -> str:
    """SeriesInstanceUID of a result series (QSM map, SEG, SR) computed from one source series.

    Args:
        study_instance_uid: StudyInstanceUID of the source study.
        source_series_uid: SeriesInstanceUID of the series the result was computed from (the
            magnitude series for a GRE acquisition).
        kind: what the series holds, e.g. ``"QSM STAR-QSM"``, ``"SEG CMB"``, ``"SR CMB"``.
        algorithm_version: the product's algorithm version (e.g. ``"1.2.0"``).
    """
    for name, value in (("study_instance_uid", study_instance_uid), ("source_series_uid", source_series_uid),
                        ("kind", kind), ("algorithm_version", algorithm_version)):
        if not value:
            raise ValueError(f"result_series_uid: {name} is empty")
    return derived_uid("series", study_instance_uid, source_series_uid, kind, algorithm_version)


def result_instance_uid(series_uid: str, index: int) -> str:
    """SOPInstanceUID of instance ``index`` (0-based) of the result series ``series_uid``."""
    if int(index) < 0:
        raise ValueError(f"result_instance_uid: index must be >= 0, got {index}")
    return derived_uid("instance", series_uid, str(int(index)))
