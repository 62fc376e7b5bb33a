"""C-STORE SCU that delivers results (the SR) to the PACS, and C-ECHO to check the route.

Every failure becomes a `DeliveryError` whose `retryable` tells the task layer what to do:

============================================  =========  =============================================
What happened                                 retryable  Why
============================================  =========  =============================================
TCP connect refused / unreachable / timeout   yes        PACS down or restarting
association rejected (transient or permanent) yes        busy PACS, or an AE title fixed while retrying
association aborted, no response, timeout     yes        network or PACS trouble mid-transfer
no presentation context accepted              no         the PACS does not take this SOP class
C-STORE 0xA7xx out of resources               yes        the PACS is full or busy now
C-STORE 0x0213 resource limitation            yes        same, general DIMSE status
C-STORE 0x0110 processing failure             yes        PACS-internal error, often transient
C-STORE 0xA9xx data set does not match class  no         the same bytes get the same answer
C-STORE 0xCxxx cannot understand              no         the same bytes get the same answer
C-STORE 0x0117/0x0122/0x0124/0x021x/other     no         refused object or peer bug: needs a person
C-STORE warnings 0xBxxx, 0x0001, 0x0107/0116  success    stored (coerced / elements discarded)
============================================  =========  =============================================

pynetdicom never sets TCP_NODELAY; with Nagle on, every small PDU (the C-STORE response, the
release) waits for a delayed ACK, so it is set on our socket as soon as it connects. Logs name the
peer, SOP classes and statuses only, never patient data.
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_fusion.service.errors import DeliveryError

__all__ = ["DicomNode", "StoreOutcome", "classify_store_status", "echo", "store_to_pacs"]

LOGGER = logging.getLogger(__name__)

_MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def _check_ae_title(argument: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f'Argument "{argument}" must be a str, got {type(value).__name__}.')
    if not value.strip() or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(
            f'Argument "{argument}" must be 1 to 16 printable characters without backslash, '
            f"got {value!r}."
        )
    return value


@dataclass(frozen=True)
class DicomNode:
    """A remote DICOM application entity: the AE title it answers to, and where it listens."""

    ae_title: str
    host: str
    port: int

    def __post_init__(self) -> None:
        _check_ae_title("ae_title", self.ae_title)
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f'Argument "host" must be a non-empty str, got {self.host!r}.')
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f'Argument "port" must be an int, got {type(self.port).__name__}.')
        if not 1 <= self.port <= 65535:
            raise ValueError(f'Argument "port" must be in 1..65535, got {self.port}.')

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class StoreOutcome(Enum):
    """What a C-STORE response status means for delivery."""

    SUCCESS = "success"
    WARNING = "warning"  # stored; the peer changed or dropped something
    RETRY = "retry"  # failed now; the same request may succeed later
    FAIL = "fail"  # failed for good; retrying sends the same bytes to the same answer


def classify_store_status(status: int) -> StoreOutcome:
    """Map a C-STORE response status (PS3.4 B.2.3, PS3.7 C) to a `StoreOutcome` (table above)."""
    if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 0xFFFF:
        raise ValueError(f"A DIMSE status is an int in 0..0xFFFF, got {status!r}.")
    if status == 0x0000:
        return StoreOutcome.SUCCESS
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return StoreOutcome.WARNING
    if 0xA700 <= status <= 0xA7FF or status in (0x0110, 0x0213):
        return StoreOutcome.RETRY
    return StoreOutcome.FAIL


def store_to_pacs(
    datasets: Sequence[Dataset | Path],
    target: DicomNode,
    *,
    calling_ae: str,
    timeout: float = 30.0,
) -> None:
    """Send `datasets` (datasets or DICOM files) to `target` over one association, in order.

    Each SOP class is proposed with the datasets' own transfer syntax, plus Explicit and Implicit
    VR Little Endian when that syntax is uncompressed (so a PACS that only takes implicit VR still
    gets them). `timeout` (seconds) bounds connecting, association negotiation, each network read
    and each C-STORE response. Returns when every dataset was stored (warnings count as stored).

    Raises:
        TypeError, ValueError: invalid arguments (nothing was sent).
        OSError, pydicom.errors.InvalidDicomError: a file could not be read (nothing was sent).
        DeliveryError: on the first dataset that could not be delivered; `retryable` says whether
            sending again later can succeed. Datasets before it were stored.
    """
    if not isinstance(target, DicomNode):
        raise TypeError(f'Argument "target" must be a DicomNode, got {type(target).__name__}.')
    _check_ae_title("calling_ae", calling_ae)
    _check_timeout(timeout)
    if isinstance(datasets, (Dataset, str, Path)) or not isinstance(datasets, Sequence):
        raise TypeError('Argument "datasets" must be a sequence of pydicom Datasets or paths.')
    if len(datasets) == 0:
        raise ValueError("No datasets were provided.")
    loaded = [_load(item, index) for index, item in enumerate(datasets, 1)]
    contexts = _requested_contexts(loaded)

    ae = _application_entity(calling_ae, timeout)
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))
    started = time.monotonic()
    assoc: Association | None = None
    sent = False
    try:
        assoc = _associate(ae, target, calling_ae, timeout)
        for index, ds in enumerate(loaded, 1):
            _store_one(assoc, ds, index=index, total=len(loaded), target=target, timeout=timeout)
        sent = True
    finally:
        _close(assoc, graceful=sent)
        ae.shutdown()
    LOGGER.info(
        "Stored %d instance(s) to %s in %.2f s", len(loaded), target, time.monotonic() - started
    )


def echo(target: DicomNode, calling_ae: str, timeout: float = 10.0) -> bool:
    """Return whether `target` answers a C-ECHO (Verification) with success; never raises for a
    network or peer problem (the reason is logged), only for invalid arguments."""
    if not isinstance(target, DicomNode):
        raise TypeError(f'Argument "target" must be a DicomNode, got {type(target).__name__}.')
    _check_ae_title("calling_ae", calling_ae)
    _check_timeout(timeout)
    ae = _application_entity(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc: Association | None = None
    answered = False
    try:
        assoc = _associate(ae, target, calling_ae, timeout)
        response = assoc.send_c_echo()
        status = response.get("Status") if response else None
        if status != 0x0000:
            shown = "no response" if status is None else f"status 0x{status:04X}"
            LOGGER.warning("C-ECHO to %s failed: %s", target, shown)
            return False
        answered = True
        return True
    except DeliveryError as exc:
        LOGGER.warning("C-ECHO to %s failed: %s", target, exc)
        return False
    finally:
        _close(assoc, graceful=answered)
        ae.shutdown()


# --- helpers -----------------------------------------------------------------------------------


def _close(assoc: Association | None, *, graceful: bool) -> None:
    """End the association: released when every request was answered, aborted otherwise.

    A graceful release waits up to ``acse_timeout`` (= the call's timeout, ``pacs.timeout``) for the
    peer's A-RELEASE-RP. After a failure that wait buys nothing and is exactly what a hung PACS never
    answers: a stage whose soft time limit fired mid-C-STORE would sit the full timeout again in
    ``finally`` before the worker could fail the job. An A-ABORT is one PDU and a socket close
    (bounded by pynetdicom's ~0.1 s shutdown), and is what PS3.8 prescribes for an unusable association.
    """
    if assoc is None or not assoc.is_established:
        return
    if graceful:
        assoc.release()
    else:
        assoc.abort()


def _check_timeout(timeout: object) -> None:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f'Argument "timeout" must be a positive number of seconds, got {timeout!r}.')


def _load(item: Dataset | Path, index: int) -> Dataset:
    """Return a dataset with SOP Class/Instance UIDs and a file meta Transfer Syntax UID."""
    ds: Dataset
    if isinstance(item, (str, Path)):
        ds = dcmread(item)
    elif isinstance(item, Dataset):
        ds = item
    else:
        raise TypeError(f"Dataset #{index} must be a pydicom Dataset or a path, got {type(item).__name__}.")
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if not ds.get(keyword):
            raise ValueError(f"Dataset #{index} has no {keyword}.")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # Built in memory: give a shallow copy a file meta so the caller's dataset stays as it was.
        copy = Dataset(ds)
        copy.file_meta = FileMetaDataset(meta) if meta is not None else FileMetaDataset()
        copy.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = copy
    return ds


def _requested_contexts(datasets: Sequence[Dataset]) -> list[tuple[UID, tuple[UID, ...]]]:
    """One context per SOP class for uncompressed data (three syntaxes, pynetdicom converts among
    them) and one per (SOP class, syntax) for compressed data, which can only go as it is."""
    contexts: dict[tuple[UID, UID | None], list[UID]] = {}
    for ds in datasets:
        sop_class, syntax = UID(ds.SOPClassUID), UID(ds.file_meta.TransferSyntaxUID)
        if syntax.is_compressed or syntax.is_deflated or not syntax.is_little_endian:
            contexts.setdefault((sop_class, syntax), [syntax])
        else:
            offered = contexts.setdefault((sop_class, None), [])
            for candidate in (syntax, *_UNCOMPRESSED):
                if candidate not in offered:
                    offered.append(candidate)
    if len(contexts) > _MAX_CONTEXTS:
        raise ValueError(
            f"The datasets need {len(contexts)} presentation contexts; one association allows "
            f"{_MAX_CONTEXTS}. Send them in smaller batches."
        )
    return [(sop_class, tuple(syntaxes)) for (sop_class, _), syntaxes in contexts.items()]


def _application_entity(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = 0  # we receive only small responses; 0 = no limit on the peer's PDUs
    return ae


def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle before the A-ASSOCIATE-RQ goes out."""
    try:
        sock = event.assoc.dul.socket.socket  # type: ignore[union-attr]
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError) as exc:  # not fatal: only slower
        LOGGER.debug("Could not set TCP_NODELAY: %s", exc)


def _associate(ae: AE, target: DicomNode, calling_ae: str, timeout: float) -> Association:
    """Open an association or raise DeliveryError saying what to check."""
    opened: list[bool] = []
    accepted: list[bool] = []
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_CONN_OPEN, _set_nodelay),
        (evt.EVT_CONN_OPEN, lambda event: opened.append(True)),
        (evt.EVT_ACCEPTED, lambda event: accepted.append(True)),
    ]
    assoc = ae.associate(
        target.host, target.port, ae_title=target.ae_title, max_pdu=0, evt_handlers=handlers
    )
    if assoc.is_established:
        return assoc
    if not opened:
        raise DeliveryError(
            f"Could not connect to the PACS at {target.host}:{target.port} (refused, unreachable or "
            f"no answer within {timeout:g} s): check pacs.host and pacs.port and that the PACS is "
            "running and reachable from this host.",
            retryable=True,
        )
    if assoc.is_rejected:
        reply = assoc.acceptor.primitive
        detail = f"{reply.result_str}, {reply.source_str}: {reply.reason_str}" if reply else "no detail"
        raise DeliveryError(
            f"The PACS {target} rejected the association ({detail}): check that pacs.ae_title is "
            f"the PACS's own AE title ({target.ae_title!r}) and that the PACS knows our calling AE "
            f"title {calling_ae!r} with this host's address.",
            retryable=True,
        )
    if accepted and not assoc.accepted_contexts:
        offered = sorted(  # all requested contexts were rejected
            f"{UID(cx.abstract_syntax or '').name} in "
            + " or ".join(UID(ts).name for ts in cx.transfer_syntax)
            for cx in assoc.requestor.requested_contexts
        )
        raise DeliveryError(
            f"The PACS {target} accepted none of the proposed SOP classes / transfer syntaxes "
            f"({'; '.join(offered)}): configure the PACS to accept them from our AE title.",
            retryable=False,
        )
    raise DeliveryError(
        f"The association with the PACS {target} was aborted or timed out during negotiation "
        f"(timeout {timeout:g} s): check that {target.host}:{target.port} is a DICOM port and the "
        "PACS logs.",
        retryable=True,
    )


def _store_one(
    assoc: Association, ds: Dataset, *, index: int, total: int, target: DicomNode, timeout: float
) -> None:
    sop_class = UID(ds.SOPClassUID)
    what = f"dataset {index}/{total} ({sop_class.name})"
    if not assoc.is_established:
        raise DeliveryError(
            f"The association with {target} ended before {what} was sent: check the PACS logs.",
            retryable=True,
        )
    try:
        response = assoc.send_c_store(ds, msg_id=index)
    except ValueError as exc:
        # pynetdicom: no accepted presentation context for this SOP class / transfer syntax.
        raise DeliveryError(
            f"The PACS {target} does not accept {what} in {UID(ds.file_meta.TransferSyntaxUID).name}: "
            f"configure the PACS to accept this SOP class ({exc}).",
            retryable=False,
        ) from exc
    status = response.get("Status") if response else None
    if status is None:
        raise DeliveryError(
            f"No C-STORE response from {target} for {what} within {timeout:g} s, or the association "
            "was aborted: check the network and the PACS logs.",
            retryable=True,
        )
    outcome = classify_store_status(int(status))
    if outcome is StoreOutcome.SUCCESS:
        return
    if outcome is StoreOutcome.WARNING:
        LOGGER.warning("PACS %s stored %s with warning status 0x%04X", target, what, status)
        return
    comment = response.get("ErrorComment")
    detail = f"status 0x{status:04X}" + (f", {comment}" if comment else "")
    if outcome is StoreOutcome.RETRY:
        raise DeliveryError(
            f"The PACS {target} could not store {what} now ({detail}): it reports lack of resources "
            "or a processing failure; check its disk space and logs. Will retry.",
            retryable=True,
        )
    raise DeliveryError(
        f"The PACS {target} refused {what} ({detail}): check the PACS logs and that it supports "
        "this SOP class; sending the same object again will not help.",
        retryable=False,
    )
