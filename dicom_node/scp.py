"""The DICOM listener: C-ECHO and C-STORE SCP.

The C-STORE handler is a thin adapter (pynetdicom runs one thread per association): validate the
identifiers, write the Part 10 header and the received dataset's buffer to the spool with fsync,
record the instance in the database, return a status. It never decodes pixels and never runs an
engine. Anything that prevents durable storage answers Out of Resources (0xA700), so the sender
keeps its copy and retries.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import dimse_guard, part10, statuses
from dicom_node.admission import AdmissionPolicy, AdmissionServer, start_admission_server
from dicom_node.audit.reception import SUBJECT_KEYWORDS, Subject, read_subject
from dicom_node.audit.trail import AuditTrail
from dicom_node.config import ROUTABLE_ATTRIBUTES, ListenerConfig, OtherStorage
from dicom_node.logs import get_logger, safe_error_text
from dicom_node.metrics import NodeMetrics, RejectionReason, rejection_reason
from dicom_node.preflight import DatasetRejectedError, ReceptionLimits, read_header
from dicom_node.spool import Spool, SpoolError
from dicom_node.store import InstanceRecord, JobStore, ReceiveOutcome
from dicom_node.tls import make_ssl_context
from engine.derived import is_ltdiff_output
from engine.dicom_facts import CT_SOP_CLASSES, functional_group_items, is_valid_uid
from engine.durable import content_length

log = get_logger("dicom_node.scp")

#: Transfer syntaxes accepted on reception: uncompressed, deflate and the lossless and lossy
#: compressed syntaxes that pydicom decodes with the pylibjpeg plugins when a series is processed.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm (small PDUs otherwise wait ~40 ms)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.warning("net.nodelay_failed")


#: Where Enhanced CT keeps attributes that single-frame CT has at the top level (PS3.3 C.8.15.3):
#: functional group macro sequence -> attribute.
_FUNCTIONAL_GROUP_SOURCES = {
    "ConvolutionKernel": "CTReconstructionSequence",
    "ImageType": "CTImageFrameTypeSequence",  # FrameType there
}


def _from_functional_groups(ds: Dataset, keyword: str) -> object:
    """An attribute of frame 1 of an Enhanced CT instance, from its functional groups."""
    macro = _FUNCTIONAL_GROUP_SOURCES.get(keyword)
    if macro is None:
        return None
    attr = "FrameType" if keyword == "ImageType" else keyword
    for item in functional_group_items(ds, 0, macro):
        if item.get(attr) is not None:
            return item.get(attr)
    return None


def routing_header(ds: Dataset) -> dict[str, str]:
    """The attributes routing rules may match, as strings (multi-valued joined by backslash).

    For Enhanced CT, attributes that live in functional group macros (ConvolutionKernel in the
    CT Reconstruction macro, FrameType for ImageType) are taken from there when the top level
    has none.
    """
    header: dict[str, str] = {}
    for kw in ROUTABLE_ATTRIBUTES:
        value = ds.get(kw)
        if value is None or value == "":
            value = _from_functional_groups(ds, kw)
        if value is None:
            continue
        if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
            header[kw] = "\\".join(str(v) for v in value)
        else:
            header[kw] = str(value)
    return header


def _expected_count(ds: Dataset) -> int | None:
    value = ds.get("ImagesInAcquisition")
    try:
        n = int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return n if n and n > 0 else None


#: The top-level attributes the handler reads from a received header (the identifiers, routing,
#: `_describe`, the audit subject): `read_header` decodes only these. Reading another one in the
#: handler means adding it here (tests/unit/test_reception_header.py checks the list).
HEADER_KEYWORDS = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "SOPClassUID",
    *ROUTABLE_ATTRIBUTES,
    "PerFrameFunctionalGroupsSequence",  # Enhanced CT: routing attributes of frame 1
    "SharedFunctionalGroupsSequence",
    "ImagesInAcquisition",  # expected count
    "ContributingEquipmentSequence",  # is_ltdiff_output
    "DerivationDescription",
    *SUBJECT_KEYWORDS,
)
HEADER_TAGS = frozenset(int(tag_for_keyword(k) or 0) for k in HEADER_KEYWORDS)


@dataclass(frozen=True)
class _Described:
    """What reception records about an instance, read from its header before anything is
    written, so that no exception can come after the spool write."""

    header: dict[str, str]
    own_output: bool
    expected_count: int | None


def _describe(ds: Dataset) -> _Described:
    return _Described(
        header=routing_header(ds),
        own_output=is_ltdiff_output(ds),
        expected_count=_expected_count(ds),
    )


class InstanceLocks:
    """Copies of one SOP Instance received at once by several receiver processes: a POSIX
    byte-range lock on one byte of a shared lock file, chosen by the SOP Instance UID's CRC.

    POSIX record locks belong to the process, not the thread, so the caller holds the thread lock
    of the same stripe first (`hold`): a byte is then only ever locked by one thread of a process
    at a time. The lock goes with the process: a receiver that dies holds none. The file is
    opened once per process (closing any descriptor of it would drop the process's locks).
    """

    #: Bytes of the file used as locks; a multiple of StoreHandler._STRIPES, so that one byte is
    #: always under one thread stripe.
    BYTES = 4096

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def hold(self, thread_lock: threading.Lock, crc: int) -> Iterator[None]:
        offset = crc % self.BYTES
        with thread_lock:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, offset, os.SEEK_SET)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)

    def close(self) -> None:
        os.close(self._fd)


class StoreHandler:
    """C-STORE: bound, validate, spool durably, record, answer. Called on association threads.

    Order matters: the dataset is bounded (size, inflation, nesting, element count) before
    pydicom parses it, and everything recorded is read from the header before the spool write;
    after the write, the instance is either recorded or its file removed. Copies of one SOP
    Instance arriving at once on several associations are serialized by a lock striped over the
    SOP Instance UID: the first is stored, the others answer Success as duplicates.
    """

    _STRIPES = 64

    def __init__(
        self,
        spool: Spool,
        store: JobStore,
        limits: ReceptionLimits,
        metrics: NodeMetrics | None = None,
        audit: AuditTrail | None = None,
        *,
        lock_path: Path | None = None,
    ) -> None:
        self.spool = spool
        self.store = store
        self.limits = limits
        self.metrics = metrics or NodeMetrics()
        self.audit = audit
        self._locks = [threading.Lock() for _ in range(self._STRIPES)]
        # Receiver processes share the spool and database: their copies of one SOP Instance are
        # serialized by a byte-range lock on this file as well (module InstanceLocks).
        self._file_locks = None if lock_path is None else InstanceLocks(lock_path)

    def _lock_for(self, sop_uid: str) -> AbstractContextManager[object]:
        crc = zlib.crc32(sop_uid.encode("ascii"))
        lock = self._locks[crc % self._STRIPES]
        if self._file_locks is None:
            return lock
        return self._file_locks.hold(lock, crc)

    def __call__(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)
        transfer_syntax = str(event.context.transfer_syntax)

        def reject(status: int, reason: str, **fields: object) -> int:
            self.metrics.instance_received(status)
            log.warning(
                "instance.rejected",
                reason=reason,
                status=f"0x{status:04X}",
                transfer_syntax=transfer_syntax,
                calling_ae=event.assoc.requestor.ae_title,
                assoc=event.assoc.native_id,
                **fields,
            )
            return status

        try:
            encoded = cast(BytesIO, request.DataSet).getbuffer()
            ds = read_header(encoded, transfer_syntax, self.limits, tags=HEADER_TAGS)
            sop_uid = ds.get("SOPInstanceUID")
            series_uid = ds.get("SeriesInstanceUID")
            study_uid = ds.get("StudyInstanceUID")
            sop_class = ds.get("SOPClassUID")
        except DatasetRejectedError as exc:
            limit = statuses.CANNOT_UNDERSTAND_LIMIT_EXCEEDED
            return reject(limit if exc.limit else statuses.CANNOT_UNDERSTAND, exc.reason)
        except Exception as exc:  # noqa: BLE001 - any decode failure means "cannot understand"
            return reject(
                statuses.CANNOT_UNDERSTAND, "undecodable dataset", error=type(exc).__name__
            )
        if not all(is_valid_uid(u) for u in (sop_uid, series_uid, study_uid, sop_class)):
            return reject(
                statuses.CANNOT_UNDERSTAND_INVALID_UID,
                "missing or invalid UID (SOP instance, series, study or SOP class)",
            )
        if sop_uid != request.AffectedSOPInstanceUID:
            return reject(
                statuses.CANNOT_UNDERSTAND_UID_MISMATCH,
                "SOPInstanceUID differs from the C-STORE request",
                sop_uid=str(sop_uid),
            )
        if sop_class != request.AffectedSOPClassUID:
            return reject(
                statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "SOPClassUID differs from the presentation context",
                sop_uid=str(sop_uid),
            )
        try:
            described = _describe(ds)
        except Exception as exc:  # noqa: BLE001 - a header value pydicom cannot convert
            return reject(
                statuses.CANNOT_UNDERSTAND,
                "cannot read the attributes used for routing",
                error=type(exc).__name__,
                sop_uid=str(sop_uid),
            )
        subject = read_subject(ds) if self.audit is not None else None
        with self._lock_for(sop_uid):
            return self._store(
                event,
                ds,
                described,
                transfer_syntax,
                event.assoc.requestor.ae_title,
                subject=subject,
            )

    def _store(
        self,
        event: evt.Event,
        ds: Dataset,
        described: _Described,
        transfer_syntax: str,
        calling_ae: str,
        *,
        subject: Subject | None = None,
    ) -> int:
        sop_uid, series_uid = str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)
        path: Path | None = None
        created = False
        audited = None
        try:
            if self.store.has_instance(sop_uid):
                log.info(
                    "instance.duplicate",
                    sop_uid=sop_uid,
                    series_uid=series_uid,
                    calling_ae=calling_ae,
                )
                self.metrics.instance_received(statuses.SUCCESS, duplicate=True)
                return statuses.SUCCESS
            if self.audit is not None and subject is not None:  # counted before the commit
                audited = self.audit.instance_receiving(
                    series_uid,
                    calling_ae,
                    event.assoc.requestor.address,
                    subject,
                    str(ds.SOPClassUID),
                )
            # The file as Event.encoded_dataset() makes it, without its copies: the Part 10
            # header and the received dataset's own buffer, written side by side.
            request = cast(C_STORE, event.request)
            data = (
                part10.file_header(str(request.AffectedSOPClassUID), sop_uid, transfer_syntax),
                cast(BytesIO, request.DataSet).getbuffer(),
            )
            path, created = self.spool.store(series_uid, sop_uid, data)
            outcome = self.store.record_instance(
                InstanceRecord(
                    sop_uid=sop_uid,
                    series_uid=series_uid,
                    study_uid=str(ds.StudyInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax=transfer_syntax,
                    path=path,
                    size_bytes=content_length(data),
                    calling_ae=calling_ae,
                    header=described.header,
                    own_output=described.own_output,
                    expected_count=described.expected_count,
                )
            )
        except Exception as exc:
            if created and path is not None:
                self.spool.discard(path)  # never acknowledged: no record may point to it
            if self.audit is not None:
                self.audit.instance_not_stored(audited)
            if isinstance(exc, SpoolError):
                reason = str(exc)
            elif isinstance(exc, sqlite3.Error):
                reason = f"database: {safe_error_text(exc)}"
            else:
                reason = f"internal error: {type(exc).__name__}"
                log.exception("instance.store_error", sop_uid=sop_uid, series_uid=series_uid)
            log.error(
                "instance.refused",
                reason=reason,
                status=f"0x{statuses.OUT_OF_RESOURCES:04X}",
                series_uid=series_uid,
                calling_ae=calling_ae,
            )
            self.metrics.instance_received(statuses.OUT_OF_RESOURCES)
            return statuses.OUT_OF_RESOURCES
        if outcome is ReceiveOutcome.REOPENED:
            log.info(
                "series.reopened",
                series_uid=series_uid,
                sop_uid=sop_uid,
                reason="late instance after the series was complete",
            )
        elif outcome is ReceiveOutcome.DUPLICATE:
            log.info("instance.duplicate", sop_uid=sop_uid, series_uid=series_uid)
            if self.audit is not None:
                self.audit.instance_not_stored(audited)
        duplicate = outcome is ReceiveOutcome.DUPLICATE
        self.metrics.instance_received(statuses.SUCCESS, duplicate=duplicate)
        return statuses.SUCCESS


def build_ae(cfg: ListenerConfig, ae_class: type[AE] = AE) -> AE:
    ae = ae_class(ae_title=cfg.ae_title)
    ae.maximum_associations = cfg.max_associations
    ae.network_timeout = cfg.network_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = cfg.network_timeout_s
    if cfg.allowed_calling_ae_titles:
        ae.require_calling_aet = list(cfg.allowed_calling_ae_titles)
    ae.add_supported_context(Verification)
    classes: list[str] = list(CT_SOP_CLASSES)
    if cfg.other_storage is OtherStorage.ACCEPT:
        classes += [
            str(c.abstract_syntax)
            for c in StoragePresentationContexts
            if c.abstract_syntax and c.abstract_syntax not in classes
        ]
    for uid in classes[:127]:  # 128 presentation contexts at most, one is Verification
        ae.add_supported_context(uid, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start_listener(
    cfg: ListenerConfig,
    spool: Spool,
    store: JobStore,
    metrics: NodeMetrics | None = None,
    audit: AuditTrail | None = None,
) -> AdmissionServer:
    """Start the SCP in background threads; returns the server (call .shutdown() to stop).

    Connections go through admission first (dicom_node/admission.py): source address, TLS
    handshake and A-ASSOCIATE-RQ within `association_request_timeout_s`, before pynetdicom makes
    an Association of them. `metrics` counts C-STORE outcomes and rejections; `audit` (when the
    audit trail is on) counts received instances per series and peer and hears rejections.
    """
    metrics = metrics or NodeMetrics()
    ae = build_ae(cfg)
    handlers, refused = reception_handlers(cfg, spool, store, metrics, audit)
    ssl_context = make_ssl_context(cfg.tls, server_side=True) if cfg.tls.enabled else None
    return start_admission_server(
        ae,
        (cfg.bind_address, cfg.port),
        AdmissionPolicy.from_config(cfg),
        evt_handlers=handlers,
        ssl_context=ssl_context,
        on_rejected=refused,
    )


def reception_handlers(
    cfg: ListenerConfig,
    spool: Spool,
    store: JobStore,
    metrics: NodeMetrics,
    audit: AuditTrail | None,
    *,
    lock_path: Path | None = None,
) -> tuple[list[Any], Callable[[RejectionReason, str, str], None]]:
    """The association event handlers of the listener, and the hook admission calls for a
    connection it turns away; the same in the main process and in a receiver process (where
    `metrics` and `audit` forward to the main process, and `lock_path` names the file whose
    byte-range locks serialize copies of one instance across processes)."""

    def rejected(event: evt.Event) -> None:
        _log_rejected(event, metrics, audit)

    handlers: list[Any] = [
        (evt.EVT_C_ECHO, lambda event: statuses.SUCCESS),
        (
            evt.EVT_C_STORE,
            StoreHandler(spool, store, cfg.limits, metrics, audit, lock_path=lock_path),
        ),
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        (evt.EVT_CONN_OPEN, dimse_guard.install),  # answer or abort malformed requests
        (evt.EVT_REJECTED, rejected),
    ]
    return handlers, rejection_hook(metrics, audit)


def rejection_hook(
    metrics: NodeMetrics, audit: AuditTrail | None
) -> Callable[[RejectionReason, str, str], None]:
    """What admission calls for a connection it turns away: counted, and audited."""

    def refused(reason: RejectionReason, address: str, detail: str) -> None:
        metrics.association_rejected(reason)
        if audit is not None:
            audit.association_rejected(reason, address, detail=detail)

    return refused


def _log_rejected(event: evt.Event, metrics: NodeMetrics, audit: AuditTrail | None) -> None:
    """EVT_REJECTED: pynetdicom sent an A-ASSOCIATE-RJ (its acceptor keeps the primitive)."""
    rj = event.assoc.acceptor.primitive
    reason = rejection_reason(getattr(rj, "result_source", None), getattr(rj, "diagnostic", None))
    metrics.association_rejected(reason)
    log.warning(
        "association.rejected",
        reason=reason.value,
        calling_ae=event.assoc.requestor.ae_title,
        address=event.assoc.requestor.address,
    )
    if audit is not None:
        called = getattr(event.assoc.requestor.primitive, "called_ae_title", None)
        audit.association_rejected(
            reason,
            event.assoc.requestor.address,
            event.assoc.requestor.ae_title,
            None if called is None else f"called AE title {str(called).strip()}",
        )
