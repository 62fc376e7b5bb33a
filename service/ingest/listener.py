"""DICOM C-ECHO / C-STORE SCP: the ingest hot path.

Handler contract (the only statuses :func:`StoreHandler.__call__` returns):

=========  ==========================================================================
0x0000     stored durably (spool fsync + ledger row, by a group commit), or a duplicate already stored
0xA700     out of resources: the spool or the ledger could not make it durable (the whole batch), or the
           spool's free space is under ``spool.min_free_mb`` (:mod:`.lowwater`; nothing read or written)
0xA900     dataset does not match the request (SOP Instance UID differs, UIDs missing)
0xC000     cannot understand: the dataset is not well-formed (truncated, sequences not closed, encoding
           not the declared transfer syntax: :mod:`.wellformed`) or cannot be parsed (quarantined with a reason)
=========  ==========================================================================

Exceptions never escape a handler: they become one of these statuses here and the listener keeps
serving. Pixel data is never decoded here (only the header is parsed from the received bytes), and
this module never imports torch or MONAI so the listener starts fast and stays light.

Connections pass :mod:`.connections` (per-peer limit, handshake timeout, junk closed at once) before
pynetdicom makes an association of them.

Concurrent associations share their syncs: the handler stages the bytes and waits on the
:class:`~.committer.GroupCommitter`, which makes a whole batch durable (data, names, one ledger
transaction) before any of its waiters answers 0x0000.
"""
from __future__ import annotations

import logging
import mmap
import socket
import ssl
import threading
from collections.abc import Callable
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.tag import Tag
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # noqa: PLC2701

from dicom_fusion.service.config import ListenerSettings
from dicom_fusion.service.errors import MalformedInstanceError, SpoolError
from dicom_fusion.service.ingest.committer import GroupCommitter
from dicom_fusion.service.ingest.connections import ConnectionGate, GatedAssociationServer
from dicom_fusion.service.ingest.filemeta import received_file
from dicom_fusion.service.ingest.lowwater import LowWaterMark
from dicom_fusion.service.ingest.wellformed import check_part10
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import FilingHeader
from dicom_fusion.service.storage.spool import Spool, check_uid

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_FILING_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")
_HEADER_TAGS = [Tag(k) for k in _FILING_KEYWORDS]


def parse_header(data: bytes | mmap.mmap) -> FilingHeader:
    """Read the filing UIDs from encoded bytes (file meta + dataset) without touching pixel data. A memory
    map (STOW-RS: a part streamed to a file) is read in place, never copied."""
    if isinstance(data, mmap.mmap):
        data.seek(0)
    try:
        ds = dcmread(data if isinstance(data, mmap.mmap) else BytesIO(data), stop_before_pixels=True,
                     specific_tags=_HEADER_TAGS)
        ts = str(ds.file_meta.TransferSyntaxUID)
        values = {k: ds.get(k) for k in _FILING_KEYWORDS}
    except Exception as exc:  # pydicom raises many types on corrupt input; all mean "cannot parse"
        raise MalformedInstanceError(f"cannot parse dataset: {type(exc).__name__}: {exc}") from exc
    return _filing_header(values, ts)


def _filing_header(values: dict[str, Any], transfer_syntax: str) -> FilingHeader:
    """The filing values checked at the boundary (UIDs valid, Modality cut to 16 characters); a missing
    UID raises :class:`MalformedInstanceError` naming it."""
    return FilingHeader(
        study_uid=check_uid(values.get("StudyInstanceUID"), "StudyInstanceUID"),
        series_uid=check_uid(values.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        sop_uid=check_uid(values.get("SOPInstanceUID"), "SOPInstanceUID"),
        sop_class_uid=check_uid(values.get("SOPClassUID"), "SOPClassUID"),
        modality=str(values.get("Modality") or "").strip()[:16],
        transfer_syntax=transfer_syntax,
    )


def check_received(data: bytes | mmap.mmap) -> FilingHeader:
    """What the handler checks before it stores: the whole data set is well-formed for its declared
    transfer syntax (:func:`~.wellformed.check_part10`, every element header walked to the end), and its
    filing UIDs. Raises :class:`MalformedInstanceError` (→ 0xC000 + quarantine).

    The UIDs come from the same walk (``Structure.filing``): one pass over the header per C-STORE. A
    pydicom parse of them (:func:`parse_header`) cost 1.3-1.6 ms of CPU per instance, about a tenth of
    the listener's whole cost, for values the walk had already passed over."""
    structure = check_part10(data)
    return _filing_header(structure.filing, structure.transfer_syntax)


class StoreHandler:
    """EVT_C_STORE handler: durable first (group commit), acknowledge second."""

    def __init__(self, spool: Spool, committer: GroupCommitter,
                 on_stored: Callable[[Any, str], None] | None = None, *,
                 low_water: LowWaterMark | None = None) -> None:
        self.spool = spool
        self.committer = committer
        self.on_stored = on_stored
        self.low_water = low_water

    def __call__(self, event: evt.Event) -> int:
        if self.low_water is not None and self.low_water.refuse():
            return STATUS_OUT_OF_RESOURCES  # before the disk is full; logged once a minute there
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        try:
            requested = str(event.request.AffectedSOPInstanceUID or "")
            # the bytes pynetdicom's encoded_dataset() gives, at a fraction of its CPU (filemeta.py)
            data = received_file(event, requested) if requested else event.encoded_dataset()
        except Exception as exc:
            log.warning("C-STORE from %s: could not read the dataset stream: %s", calling_ae, exc)
            return STATUS_CANNOT_UNDERSTAND
        try:
            header = check_received(data)
        except MalformedInstanceError as exc:
            where = self.spool.quarantine(data, str(exc), calling_ae=calling_ae)
            log.warning("C-STORE from %s rejected (0xC000): %s; quarantined at %s", calling_ae, exc, where)
            return STATUS_CANNOT_UNDERSTAND
        if requested and requested != header.sop_uid:
            reason = f"SOPInstanceUID {header.sop_uid} differs from the request's {requested}"
            where = self.spool.quarantine(data, reason, calling_ae=calling_ae)
            log.warning("C-STORE from %s rejected (0xA900): %s; quarantined at %s", calling_ae, reason, where)
            return STATUS_MISMATCH
        try:
            self.committer.store(header, data, calling_ae=calling_ae)  # a duplicate keeps the first copy
        except SpoolError as exc:
            log.error("C-STORE from %s not stored (0xA700): %s", calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # ledger down/locked: not durable, so not acknowledged
            log.error("C-STORE from %s not recorded (0xA700): %s: %s", calling_ae, type(exc).__name__, exc)
            return STATUS_OUT_OF_RESOURCES
        if self.on_stored is not None:
            self.on_stored(event.assoc, header.study_uid)
        return STATUS_SUCCESS


def _set_nodelay(event: evt.Event) -> None:
    """pynetdicom leaves Nagle on; small PDUs then wait ~40 ms for ACKs (docs/architecture.md, "Pitfalls met")."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


class ReusePortServer(GatedAssociationServer):
    """The gated threaded server with ``SO_REUSEPORT``: several listener processes bind one port
    and the kernel spreads incoming associations over them (``listener.processes``)."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def build_ssl_context(settings: ListenerSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
    if tls.ca_file is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_file))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if tls.ca_file is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Listener:
    """The running SCP. ``on_release`` receives the study UIDs stored by a released association."""

    def __init__(self, settings: ListenerSettings, spool: Spool, ledger: Ledger,
                 on_release: Callable[[set[str]], None] | None = None, *, reuse_port: bool = False,
                 min_free_mb: float = 0.0) -> None:
        self.settings = settings
        self.reuse_port = reuse_port
        self._on_release = on_release
        self._assoc_studies: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self.committer = GroupCommitter(
            spool, ledger, sync_mode=spool.sync_mode,  # type: ignore[arg-type]
            max_batch=settings.commit_max_batch, max_delay=settings.commit_max_delay_ms / 1000,
            wait_timeout=max(settings.dimse_timeout, 30.0))
        self.low_water = LowWaterMark(spool.root, min_free_mb)  # spool.min_free_mb; 0 = off
        self.handler = StoreHandler(spool, self.committer, on_stored=self._note_study if on_release else None,
                                    low_water=self.low_water)
        self.gate = ConnectionGate(settings)
        self.ae = self._build_ae()
        self.server: GatedAssociationServer | None = None

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_size
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_associations = s.max_associations
        if s.allowed_calling_aes:
            ae.require_calling_aet = list(s.allowed_calling_aes)
        ae.add_supported_context(Verification)
        for uid in sorted(_STORAGE_CLASSES.values()):
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        return ae

    def _note_study(self, assoc: Any, study_uid: str) -> None:
        with self._lock:
            self._assoc_studies.setdefault(id(assoc), set()).add(study_uid)

    def _released(self, event: evt.Event) -> None:
        with self._lock:
            studies = self._assoc_studies.pop(id(event.assoc), set())
        if studies and self._on_release is not None:
            try:
                self._on_release(studies)
            except Exception as exc:  # completion falls back to the quiet period
                log.error("completion on release failed: %s", exc)

    def _aborted(self, event: evt.Event) -> None:
        # An aborted association may have sent part of a study: leave it to the quiet period.
        with self._lock:
            self._assoc_studies.pop(id(event.assoc), None)

    def start(self) -> tuple[str, int]:
        self.committer.start()
        handlers = [(evt.EVT_C_STORE, self.handler), (evt.EVT_CONN_OPEN, _set_nodelay),
                    (evt.EVT_RELEASED, self._released), (evt.EVT_ABORTED, self._aborted)]
        # Every connection passes the gate before pynetdicom makes an association of it (connections.py).
        server = self.ae.make_server(
            (self.settings.host, self.settings.port), evt_handlers=handlers,
            ssl_context=build_ssl_context(self.settings),
            server_class=ReusePortServer if self.reuse_port else GatedAssociationServer, gate=self.gate,
        )
        self.ae._servers.append(server)  # so AE.shutdown() stops it, as start_server does
        threading.Thread(target=server.serve_forever, name="listener-accept", daemon=True).start()
        self.server = server
        host, port = self.server.server_address[:2]
        log.info("listener %s on %s:%s (TLS %s, allow-list %s)", self.settings.ae_title, host, port,
                 "on" if self.settings.tls.enabled else "off",
                 ",".join(self.settings.allowed_calling_aes) or "any")
        return str(host), int(port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.committer.stop()
