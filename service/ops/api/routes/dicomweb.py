"""DICOMweb STOW-RS (PS3.18 10.5): ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{StudyInstanceUID}``.

HTTP only: the body is read from the socket chunk by chunk (``request.stream()``) and handed, in a worker
thread, to :class:`~dicom_fusion.service.ingest.stow.StowRequest`, which streams each part to the spool,
checks it as C-STORE does and commits the request's instances through the group commit once the body is
complete (README "DICOMweb (STOW-RS)"). This module maps its outcome to HTTP and builds the PS3.18 store
response (Store Instances Response Module, Annex I) as DICOM JSON (``application/dicom+json``, the default)
or the Native DICOM Model XML (``application/dicom+xml``) per ``Accept``.

HTTP statuses: 200 every instance stored (a duplicate counts as stored, as C-STORE answers it), 202 some
failed, 409 none stored — with the failed instances and their Failure Reason in the body and one ``Warning:
299`` header per failed part saying why in words; 400 a malformed body (not multipart, truncated: nothing
stored), 401/403 no token / a role without ``store`` (README "Users and roles": sender, operator, admin),
406 an ``Accept`` we cannot answer, 413 over ``dicomweb.max_request_mb``, 415 not ``multipart/related;
type="application/dicom"``, 503 the spool under its low-water mark (``Retry-After``).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Annotated
from xml.sax.saxutils import escape, quoteattr

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from starlette.requests import ClientDisconnect

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ingest.stow import (
    MultipartError,
    RequestTooLarge,
    StowIngest,
    StowOutcome,
    StowRequest,
    StowUnavailable,
    UnsupportedMediaType,
)
from dicom_fusion.service.ops.api.deps import StorePermission
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.spool import Spool
from dicom_fusion.service.storage.users import Principal

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
FEED_BYTES = 256 * 1024  # body bytes gathered before one hop to the worker thread
MAX_WARNINGS = 20  # Warning headers per response (the body lists every failure)
RETRY_AFTER_SECONDS = 60
StudyUid = Annotated[str, Path(min_length=1, max_length=64, description="Study Instance UID every instance "
                                                                          "must belong to")]


def make_ingest(settings: Settings, ledger: Ledger) -> StowIngest:
    """The API process's STOW-RS ingest (not started: the first request starts it)."""
    spool = Spool(settings.spool_dir, fsync=settings.spool.fsync, sync_mode=settings.spool.sync_mode)
    listener = settings.listener
    return StowIngest(spool, ledger, calling_ae=settings.dicomweb.calling_ae,
                      max_request_bytes=int(settings.dicomweb.max_request_mb * 2**20),
                      min_free_mb=settings.spool.min_free_mb, max_batch=listener.commit_max_batch,
                      max_delay=listener.commit_max_delay_ms / 1000,
                      wait_timeout=max(listener.dimse_timeout, 30.0))


# ---- the store response (PS3.18 Annex I) --------------------------------------------------------------
def response_dataset(outcome: StowOutcome) -> Dataset:
    """Store Instances Response Module: Retrieve URL (type 2: empty, this service has no WADO-RS),
    Referenced SOP Sequence (stored, duplicates included) and Failed SOP Sequence (with Failure Reason),
    each present only when it has an item."""
    ds = Dataset()
    ds.RetrieveURL = None
    failed, stored = outcome.failed, outcome.stored
    if failed:
        ds.FailedSOPSequence = [_reference(p.sop_class_uid, p.sop_uid, failure=p.failure) for p in failed]
    if stored:
        ds.ReferencedSOPSequence = [_reference(p.sop_class_uid, p.sop_uid) for p in stored]
    return ds


def _reference(sop_class: str, sop_uid: str, *, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class or None  # unknown for a part that could not be read
    item.ReferencedSOPInstanceUID = sop_uid or None
    if failure is None:
        item.RetrieveURL = None
    else:
        item.FailureReason = failure
    return item


def to_dicom_json(ds: Dataset) -> bytes:
    return json.dumps(ds.to_json_dict(), separators=(",", ":")).encode()


def to_dicom_xml(ds: Dataset) -> bytes:
    """PS3.19 Annex A Native DICOM Model: ``DicomAttribute`` (tag, vr, keyword) with numbered ``Value`` or
    ``Item`` children; an empty attribute has none."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n',
           '<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM" xml:space="preserve">']
    _xml_elements(ds, out)
    out.append("</NativeDicomModel>\n")
    return "".join(out).encode()


def _xml_elements(ds: Dataset, out: list[str]) -> None:
    for elem in ds:
        tag = f"{elem.tag:08X}"
        vr = str(elem.VR or dictionary_VR(elem.tag))
        out.append(f'<DicomAttribute tag="{tag}" vr="{vr}" keyword={quoteattr(keyword_for_tag(elem.tag))}>')
        if vr == "SQ":
            for n, item in enumerate(elem.value, 1):
                out.append(f'<Item number="{n}">')
                _xml_elements(item, out)
                out.append("</Item>")
        elif not elem.is_empty:
            values = elem.value if elem.VM > 1 else [elem.value]
            for n, value in enumerate(values, 1):
                out.append(f'<Value number="{n}">{escape(str(value))}</Value>')
        out.append("</DicomAttribute>")


def response_type(accept: str | None) -> str:
    """``application/dicom+json`` unless ``Accept`` prefers ``application/dicom+xml``; 406 when it admits
    neither. Quality values are honoured; ``*/*`` and ``application/*`` mean JSON."""
    if not accept or not accept.strip():
        return DICOM_JSON
    best: tuple[float, int, str] | None = None
    for position, item in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in item.split(";")]
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        chosen = {DICOM_JSON: DICOM_JSON, "application/json": DICOM_JSON, "*/*": DICOM_JSON,
                  "application/*": DICOM_JSON, DICOM_XML: DICOM_XML, "application/xml": DICOM_XML}.get(media)
        if chosen is None or q <= 0:
            continue
        if best is None or (q, -position) > (best[0], best[1]):
            best = (q, -position, chosen)
    if best is None:
        raise HTTPException(status.HTTP_406_NOT_ACCEPTABLE, f"cannot answer {accept[:100]!r}: the store response is "
                            f"{DICOM_JSON} or {DICOM_XML}")
    return best[2]


_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def warning_header(reason: str) -> str:
    """``299 dicom-fusion "<reason>"`` (RFC 7234 / PS3.18 8.3.5.1: a warning in words), ASCII only."""
    return f'299 dicom-fusion "{_UNSAFE.sub("?", reason)[:300]}"'


def store_response(outcome: StowOutcome, media_type: str) -> Response:
    ds = response_dataset(outcome)
    body = to_dicom_xml(ds) if media_type == DICOM_XML else to_dicom_json(ds)
    response = Response(body, status_code=outcome.http_status, media_type=media_type)
    for part in outcome.failed[:MAX_WARNINGS]:
        response.headers.append("Warning", warning_header(part.reason))
    return response


# ---- the routes ---------------------------------------------------------------------------------------
_RESPONSES: dict[int | str, dict[str, str]] = {
    200: {"description": "every instance stored (durably: spool fsync + ledger row), duplicates included"},
    202: {"description": "some instances stored, some failed (FailedSOPSequence, Warning headers)"},
    400: {"description": "not a well-formed multipart body (truncated: nothing stored)"},
    403: {"description": "the caller's role may not store (sender, operator, admin may)"},
    409: {"description": "no instance stored (FailedSOPSequence, Warning headers)"},
    413: {"description": "body over dicomweb.max_request_mb"},
    415: {"description": 'not multipart/related; type="application/dicom"'},
    503: {"description": "the spool is under its low-water mark or not writable"},
}
_SUMMARY = 'Store instances (multipart/related; type="application/dicom"), PS3.18 STOW-RS'


@router.post("/studies", responses=_RESPONSES, summary=_SUMMARY, response_class=Response)
async def store_instances(request: Request, who: Principal = StorePermission) -> Response:
    return await _store(request, who, None)


@router.post("/studies/{study_uid}", responses=_RESPONSES, summary=_SUMMARY + " into one study",
             response_class=Response)
async def store_study_instances(request: Request, study_uid: StudyUid, who: Principal = StorePermission) -> Response:
    return await _store(request, who, study_uid)


async def _store(request: Request, who: Principal, study_uid: str | None) -> Response:
    ingest: StowIngest | None = request.app.state.stow
    if ingest is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "STOW-RS is off (dicomweb.enabled = false)")
    media_type = response_type(request.headers.get("accept"))
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "Content-Length is not a number") from None
        if declared > ingest.max_request_bytes:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(ingest))
    try:
        stow = await run_in_threadpool(ingest.begin, request.headers.get("content-type", ""), study_uid=study_uid,
                                       who=who.username)
    except UnsupportedMediaType as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from None
    except MultipartError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except StowUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc),
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    try:
        outcome = await _stream(request, stow)
    except RequestTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except MultipartError as exc:
        log.warning("STOW-RS from %s refused (400): %s", who.username, exc)
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"{exc}: nothing stored") from None
    except ClientDisconnect:
        log.warning("STOW-RS from %s: the client went away after %d byte(s); nothing stored", who.username,
                    stow.received)
        return Response(status_code=status.HTTP_400_BAD_REQUEST)  # nobody reads it
    return store_response(outcome, media_type)


def _too_large(ingest: StowIngest) -> str:
    return (f"the body exceeds dicomweb.max_request_mb ({ingest.max_request_bytes / 2**20:.0f} MB): nothing stored; "
            "send fewer instances per request")


async def _stream(request: Request, stow: StowRequest) -> StowOutcome:
    """Read the body off the socket and feed it to ``stow`` in a worker thread (the file writes, syncs and
    checks block); any error discards what the request staged."""
    try:
        pending = bytearray()
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= FEED_BYTES:
                data, pending = bytes(pending), bytearray()
                await run_in_threadpool(stow.feed, data)
        if pending:
            await run_in_threadpool(stow.feed, bytes(pending))
        return await run_in_threadpool(stow.finish)
    except BaseException:
        stow.abort()  # a few unlinks; not awaited, so a cancelled request still cleans up
        raise
