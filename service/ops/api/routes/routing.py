"""The rule tester over the API (README "Routing"): what would happen to a study — one in the ledger, a
DICOM instance uploaded, or a header described in JSON — and the route table the running serve uses.

The same route table and decision as `serve` and `dicom-fusion routes explain` (`routing/routes.py`);
the answer names series by number and modality and routes by name, never patient data.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from dicom_fusion.service.errors import ConfigError
from dicom_fusion.service.ops.api.deps import Authorized, ContextDep
from dicom_fusion.service.routing.headers import SeriesHeader, StudyHeader, headers_from_files, headers_from_ledger
from dicom_fusion.service.routing.reload import read_status
from dicom_fusion.service.routing.routes import load_routes, phantom_pattern
from dicom_fusion.service.storage.models import Study

router = APIRouter(prefix="/api/routes", tags=["routing"], dependencies=[Authorized])
MAX_UPLOAD = 64 * 1024 * 1024  # one DICOM instance's header is enough; pixel data is not read


class SeriesIn(BaseModel):
    """One series as routing sees it (the attributes routes match on)."""

    model_config = ConfigDict(extra="forbid")
    Modality: str = Field(max_length=16)
    SOPClassUID: str = Field("", max_length=64)
    ImageType: list[Annotated[str, Field(max_length=16)]] = Field(default_factory=list, max_length=16)
    BodyPartExamined: str = Field("", max_length=64)
    SeriesDescription: str = Field("", max_length=64)
    ProtocolName: str = Field("", max_length=64)
    StationName: str = Field("", max_length=16)
    Manufacturer: str = Field("", max_length=64)
    BurnedInAnnotation: str = Field("", max_length=3)
    SeriesNumber: int | None = Field(None, ge=0, le=2**31)
    instances: int = Field(1, ge=1, le=1_000_000)
    frames_per_instance: int = Field(1, ge=1, le=100_000)


class ExplainIn(BaseModel):
    """Either a Study Instance UID in the ledger, or a described study."""

    model_config = ConfigDict(extra="forbid")
    study_uid: str | None = Field(None, pattern=r"^[0-9][0-9.]{0,63}$")
    calling_ae: str = Field("", max_length=16)
    StudyDescription: str = Field("", max_length=64)
    patient_age_years: float | None = Field(None, ge=0, le=150)
    series: list[SeriesIn] = Field(default_factory=list, max_length=1000)


class VerdictOut(BaseModel):
    route: str
    model: str
    matched: bool
    series_uids: list[str]
    why: str


class JobOut(BaseModel):
    route: str
    model: str
    series_uids: list[str]
    release: str | None


class ExplainOut(BaseModel):
    study_uid: str
    series: int
    instances: int
    excluded: str | None = Field(description="why the whole study is never processed, if it is not")
    verdicts: list[VerdictOut]
    jobs: list[JobOut] = Field(description="the jobs the study would get (several when routes say continue)")
    ignored: str | None = Field(description="why the study would be ignored, if it would")


class RouteStatusOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    source: str
    routes: list[str]
    loaded_at: str
    error: str | None = Field(description="the last reload was refused: why (the routes above stay in force)")
    error_at: str | None


def _described(body: ExplainIn) -> StudyHeader:
    if not body.series:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, "give study_uid, or series with their attributes")
    series = tuple(SeriesHeader(
        series_uid=f"series-{i + 1}", modality=s.Modality.upper(), sop_class_uid=s.SOPClassUID,
        image_type=tuple(v.upper() for v in s.ImageType), body_part=s.BodyPartExamined,
        series_description=s.SeriesDescription, protocol_name=s.ProtocolName, station_name=s.StationName,
        manufacturer=s.Manufacturer, burned_in_annotation=s.BurnedInAnnotation.upper(),
        series_number=s.SeriesNumber if s.SeriesNumber is not None else i + 1, instances=s.instances,
        frames=s.instances * s.frames_per_instance) for i, s in enumerate(body.series))
    return StudyHeader(study_uid="described", study_description=body.StudyDescription, calling_ae=body.calling_ae,
                       patient_age_years=body.patient_age_years, phantom=False, series=series)


async def _study(request: Request, ctx: ContextDep) -> StudyHeader | None:
    settings = ctx.settings
    timeout = settings.routing.regex_timeout_ms / 1000.0
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/dicom":
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_UPLOAD:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_UPLOAD >> 20} MB")
        with tempfile.TemporaryDirectory(prefix="explain-") as tmp:
            path, got = Path(tmp) / "upload.dcm", 0
            with path.open("wb") as fh:
                async for chunk in request.stream():
                    got += len(chunk)
                    if got > MAX_UPLOAD:
                        raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"at most {MAX_UPLOAD >> 20} MB")
                    fh.write(chunk)
            try:
                return headers_from_files([path], calling_ae=request.query_params.get("calling_ae", "")[:16],
                                          phantom_pattern=phantom_pattern(settings), timeout=timeout)
            except ValueError as exc:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    if kind != "application/json":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send application/json or application/dicom")
    try:
        body = ExplainIn.model_validate_json(await request.body())
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, f"not an explain request: {exc}") from exc
    if body.study_uid is None:
        return _described(body)
    with ctx.ledger.session() as s:
        study_id = s.scalar(select(Study.id).where(Study.study_uid == body.study_uid))
    if study_id is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {body.study_uid} in the ledger")
    return headers_from_ledger(ctx.ledger, study_id, phantom_pattern=phantom_pattern(settings), timeout=timeout)


@router.post("/explain", response_model=ExplainOut, responses={
    404: {"description": "unknown study"}, 413: {"description": "upload too large"},
    415: {"description": "neither JSON nor DICOM"}, 422: {"description": "unreadable request"}},
    # the JSON body is documented; the same route takes one DICOM instance as `application/dicom` (README)
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": ExplainIn.model_json_schema()}}}},
    summary="What would happen to a study: exclusions, every route's verdict and why, the jobs it would get",
    description="Body: JSON (a study in the ledger, or a described study), or one DICOM instance sent as "
                "`Content-Type: application/dicom` (its header is read; at most 64 MB).")
async def explain(request: Request, ctx: ContextDep) -> ExplainOut:
    try:
        table = load_routes(ctx.settings)
    except ConfigError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"the route table is invalid: {exc}") from exc
    study = await _study(request, ctx)
    decision = table.decide(study)
    excluded, verdicts = table.explain(study) if study is not None else (None, [])
    return ExplainOut(
        study_uid=study.study_uid if study is not None else "", series=len(study.series) if study else 0,
        instances=study.instances if study else 0, excluded=excluded,
        verdicts=[VerdictOut(route=v.route, model=v.model, matched=v.matched, series_uids=list(v.series_uids),
                             why=v.why) for v in verdicts],
        jobs=[JobOut(route=p.route, model=p.model, series_uids=list(p.series_uids), release=p.release)
              for p in decision.plans],
        ignored=decision.ignored)


@router.get("/status", response_model=RouteStatusOut, responses={404: {"description": "no serve has run here"}},
            summary="The route table the running serve uses, and the last refused reload")
def route_status(ctx: ContextDep) -> Any:
    found = read_status(ctx.settings.data_dir)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no route status: serve has not run with this data_dir")
    return RouteStatusOut.model_validate(found)
