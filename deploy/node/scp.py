"""Storage SCP: receive instances with C-STORE and store each one durably before answering.

The C-STORE handler, for every instance:

1. refuses with 0xA700 (Out of Resources) when the spool's free space is below ``min_free_mb``;
2. decodes the data set as received; a data set that cannot be decoded answers 0xC210;
3. validates StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID (digits and dots, <= 64
   characters); a hostile or malformed UID answers 0xC220 and nothing is written; a SOP Instance
   UID that differs from the one in the C-STORE request answers 0xC221;
4. recognises a duplicate (same SOP Instance UID, same SHA-256 of the encoded dataset, file
   present) and answers Success without storing it twice;
5. writes the file (preamble, file meta built here, data set bytes exactly as received) durably
   with ``Spool.durable_write``: with ``ingest_journal`` (default) one journal record, fdatasynced
   together with concurrent associations' records (group commit), then the file renamed to
   ``instances/<study>/<series>/<sop>.dcm``; without it a temp file fsynced, renamed, and the
   folder fsynced (shared with concurrent writers, ``spool.DirSyncer``). A full disk answers
   0xA700, another I/O error 0xC230;
6. records, with the row, what the instance says about its series' completeness (position, echo,
   EchoTrainLength, ImagesInAcquisition, per-frame groups: :func:`completeness_evidence`);
7. commits the instance row to the SQLite queue, and only then answers 0x0000. The journal record
   or the fsynced file is the durable record, so the row's commit skips the WAL fsync (``reconcile`` re-registers
   the file after a power cut); the commit is durable when it deletes an older copy
   (an instance moved to another study/series). Reasoning: deploy/README.md.

Any other exception answers 0xC211 (pynetdicom's status for a failed handler); the node keeps
running. Calling AE titles not in ``allowed_calling_aets`` are refused at association time.
"""

from __future__ import annotations

import hashlib
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from pynetdicom import (ALL_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID,
                        PYNETDICOM_IMPLEMENTATION_VERSION, sop_class)

from .completeness import COMPONENTS, completeness_fields
from .logs import log_event
from .queue import InstanceRecord, Queue
from .scheduler import image_component
from .spool import InvalidUID, OutOfSpace, Spool, validate_uid

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_DECODE = 0xC210
STATUS_INVALID_UID = 0xC220
STATUS_UID_MISMATCH = 0xC221
STATUS_STORE_FAILED = 0xC230

#: What an MR scanner (and a PACS forwarding an MR study) sends.
STORAGE_SOP_CLASSES: tuple[str, ...] = tuple(str(getattr(sop_class, name)) for name in (
    "MRImageStorage",
    "EnhancedMRImageStorage",
    "EnhancedMRColorImageStorage",
    "LegacyConvertedEnhancedMRImageStorage",
    "MRSpectroscopyStorage",
    "RawDataStorage",
    "SecondaryCaptureImageStorage",
    "MultiFrameSingleBitSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "GrayscaleSoftcopyPresentationStateStorage",
    "BasicTextSRStorage",
    "EnhancedSRStorage",
    "ComprehensiveSRStorage",
    "Comprehensive3DSRStorage",
    "KeyObjectSelectionDocumentStorage",
    "EncapsulatedPDFStorage",
    "SegmentationStorage",
    "ParametricMapStorage",
    "CTImageStorage",
    "EnhancedCTImageStorage",
))

TRANSFER_SYNTAXES = list(ALL_TRANSFER_SYNTAXES)

_GE_IMAGE_TYPE = Tag(0x0043, 0x102F)
def decode(raw: bytes, transfer_syntax: str) -> Any:
    """Decode the data set as received (what pynetdicom's ``Event.dataset`` does).

    The whole data set is walked, so a structurally broken one (a sequence item that is not an
    item, say) raises here and answers 0xC210 instead of being stored. Deflated transfer syntaxes
    are inflated first. Element values are converted only when read.
    """
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    ds = read_dataset(io.BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian)
    if len(ds) == 0:
        raise ValueError(f"no data element could be read from {len(raw)} bytes")
    return ds


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _uid_value(uid: str) -> bytes:
    b = uid.encode("ascii")
    return b + b"\x00" if len(b) % 2 else b


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (explicit VR little endian).

    The same elements pynetdicom's ``Event.file_meta`` holds, encoded directly (pydicom's writer
    costs about a millisecond per instance). UIDs must already be validated (ASCII).
    """
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, 0x0002, b"UI", _uid_value(sop_class_uid)),
        _element(0x0002, 0x0003, b"UI", _uid_value(sop_instance_uid)),
        _element(0x0002, 0x0010, b"UI", _uid_value(transfer_syntax)),
        _element(0x0002, 0x0012, b"UI", _uid_value(PYNETDICOM_IMPLEMENTATION_UID)),
        _element(0x0002, 0x0013, b"SH", version),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _ge_component(ds: Any) -> int | None:
    try:
        elem = ds.get(_GE_IMAGE_TYPE)
        if elem is None:
            return None
        value = elem.value
        if isinstance(value, bytes):
            return int.from_bytes(value[:2], "little") if len(value) >= 2 else None
        return int(value)
    except Exception:
        return None


def completeness_evidence(ds: Any, component: str) -> tuple[str, dict[str, Any]]:
    """The image component (a ComplexImageComponent MAGNITUDE / PHASE / REAL / IMAGINARY wins over
    the ImageType guess) and what the instance says about its series' completeness, for the
    scheduler's early start (deploy/node/completeness.py). Never raises."""
    geometry = completeness_fields(ds, component)
    try:
        cic = str(ds.get("ComplexImageComponent", "") or "").upper()
    except Exception:
        cic = ""
    return COMPONENTS.get(cic, component), geometry


def _is_uid(value: str) -> bool:
    try:
        validate_uid(value)
        return True
    except InvalidUID:
        return False


class StoreHandler:
    """The C-STORE / C-ECHO handlers bound to one spool and one queue."""

    def __init__(self, spool: Spool, queue: Queue, clock: Callable[[], float] = time.time) -> None:
        self.spool = spool
        self.queue = queue
        self.clock = clock
        self._locks = [threading.Lock() for _ in range(64)]

    def handle_echo(self, event: Any) -> int:
        log_event("echo", calling_aet=event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def handle_store(self, event: Any) -> int:
        calling = event.assoc.requestor.ae_title
        try:
            return self._store(event, calling)
        except Exception as exc:  # never let a hostile peer crash the association thread silently
            log_event("store_error", level="error", calling_aet=calling,
                      error=f"{type(exc).__name__}: {exc}")
            return 0xC211

    def _store(self, event: Any, calling: str) -> int:
        try:
            self.spool.check_free_space()
        except OutOfSpace as exc:
            log_event("store_refused", level="warning", calling_aet=calling, status="0xA700",
                      reason=exc.strerror)
            return STATUS_OUT_OF_RESOURCES

        transfer_syntax = str(event.context.transfer_syntax)
        try:
            raw = event.encoded_dataset(include_meta=False)
            ds = decode(raw, transfer_syntax)
            raw_uids = (ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID"),
                        ds.get("SOPInstanceUID"))
            sop_class_uid = str(ds.get("SOPClassUID", "") or event.request.AffectedSOPClassUID)
            modality = _text(ds, "Modality")
            image_type = _text(ds, "ImageType")
            description = _text(ds, "SeriesDescription")
            component = image_component(image_type, _ge_component(ds))
            component, geometry = completeness_evidence(ds, component)
        except Exception as exc:
            log_event("store_rejected", level="warning", calling_aet=calling, status="0xC210",
                      reason=f"dataset cannot be decoded: {type(exc).__name__}: {exc}"[:300])
            return STATUS_CANNOT_DECODE

        try:
            study = validate_uid(raw_uids[0], "StudyInstanceUID")
            series = validate_uid(raw_uids[1], "SeriesInstanceUID")
            sop = validate_uid(raw_uids[2], "SOPInstanceUID")
        except InvalidUID as exc:
            log_event("store_rejected", level="warning", calling_aet=calling, status="0xC220",
                      reason=str(exc))
            return STATUS_INVALID_UID
        requested = str(event.request.AffectedSOPInstanceUID or "").rstrip("\x00 ")
        if requested != sop:
            log_event("store_rejected", level="warning", calling_aet=calling, study_uid=study,
                      status="0xC221", reason="SOP Instance UID differs from the C-STORE request")
            return STATUS_UID_MISMATCH

        sop_class_uid = validate_uid(sop_class_uid, "SOPClassUID") \
            if _is_uid(sop_class_uid) else str(event.request.AffectedSOPClassUID)
        data = file_meta(sop_class_uid, sop, transfer_syntax) + raw
        digest = hashlib.sha256(data).hexdigest()
        path = self.spool.instance_path(study, series, sop)
        rel = str(path.relative_to(self.spool.root))

        with self._locks[hash(sop) % len(self._locks)]:
            existing = self.queue.find_instance(sop)
            if existing is not None and existing["sha256"] == digest and \
                    (self.spool.root / existing["path"]).is_file():
                log_event("instance_duplicate", calling_aet=calling, study_uid=study,
                          sop_instance_uid=sop)
                return STATUS_SUCCESS
            try:
                self.spool.durable_write(path, data)
            except OutOfSpace as exc:
                log_event("store_refused", level="warning", calling_aet=calling, study_uid=study,
                          status="0xA700", reason=exc.strerror)
                return STATUS_OUT_OF_RESOURCES
            except OSError as exc:
                log_event("store_failed", level="error", calling_aet=calling, study_uid=study,
                          status="0xC230", reason=f"cannot write to the spool: {exc}")
                return STATUS_STORE_FAILED
            # The fsynced file is the durable record; the queue row may be committed without its
            # own fsync (reconcile re-registers it after a power cut), except when an instance
            # moves to another study/series and the old file is deleted (see deploy/README.md).
            moved = existing is not None and existing["path"] != rel
            outcome = self.queue.record_instance(InstanceRecord(
                sop_instance_uid=sop, study_uid=study, series_uid=series,
                sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax,
                path=rel, sha256=digest, size=len(data), calling_aet=calling, modality=modality,
                image_type=image_type, series_description=description, component=component,
                geometry=geometry,
            ), self.clock(), durable=moved)
            if outcome == "replaced" and moved:
                # same SOP Instance UID re-sent under another study/series: drop the old copy
                (self.spool.root / existing["path"]).unlink(missing_ok=True)
        log_event("instance_stored", calling_aet=calling, study_uid=study, series_uid=series,
                  sop_instance_uid=sop, outcome=outcome, bytes=len(data))
        return STATUS_SUCCESS
