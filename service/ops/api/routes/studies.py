"""Studies: list, drill-down, and the operator actions retry / replay / redeliver."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import AfterValidator

from dicom_fusion.service.ops import monitoring, operations
from dicom_fusion.service.ops.api.deps import ApiContext, Authorized, ContextDep, Operate, PrincipalDep
from dicom_fusion.service.ops.api.schemas import ActionOut, JobOut, RedeliverOut, StudyDetailOut, StudyPageOut

router = APIRouter(prefix="/api/studies", tags=["studies"], dependencies=[Authorized])
#: Pages past this are refused (422) rather than handed to the database: the offset
#: (page - 1) * page_size must fit a 64-bit integer, and no ledger holds 500 million studies.
MAX_PAGE = 1_000_000


def _naive_utc(ts: datetime) -> datetime:
    """The ledger stores naive UTC: an aware time is converted, a naive one is taken as UTC. A time whose
    conversion leaves the calendar (0001-01-01T00:00+14:00) is a 422, not an OverflowError's 500."""
    if ts.tzinfo is None:
        return ts
    try:
        return ts.astimezone(UTC).replace(tzinfo=None)
    except OverflowError:
        raise ValueError("the time is outside years 1-9999 once converted to UTC; give a later/earlier one") \
            from None


UtcTime = Annotated[datetime, AfterValidator(_naive_utc)]
StudyUID = Annotated[str, Path(pattern=r"^[0-9][0-9.]{0,63}$", description="Study Instance UID")]
_STATES = "|".join(monitoring.STUDY_STATES)


@router.get("", response_model=StudyPageOut, summary="Studies, most recent first, paged")
def list_studies(
    ctx: ContextDep,
    state: Annotated[str | None, Query(pattern=f"^({_STATES})$",
                                       description="receiving, or the state of the latest job")] = None,
    received_after: Annotated[UtcTime | None, Query(description="last instance at or after (UTC unless an "
                                                    "offset is given)")] = None,
    received_before: Annotated[UtcTime | None, Query(description="last instance before (UTC unless an "
                                                     "offset is given)")] = None,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
) -> StudyPageOut:
    result = monitoring.list_studies(ctx.ledger, state=state, received_after=received_after,
                                     received_before=received_before, page=page, page_size=page_size)
    return StudyPageOut.model_validate(result)


def study_out(ctx: ApiContext, detail: monitoring.StudyDetail) -> StudyDetailOut:
    base = ctx.settings.fhir.shown_base_url.rstrip("/")  # never the userinfo of fhir.base_url
    jobs = [JobOut.model_validate(j).model_copy(
        update={"report_url": f"{base}/{j.report_id}" if base and j.report_id else None}) for j in detail.jobs]
    out = StudyDetailOut.model_validate(detail)
    return out.model_copy(update={"jobs": jobs})


@router.get("/{study_uid}", response_model=StudyDetailOut,
            summary="One study: instances, series, job versions with history, deliveries, errors",
            responses={404: {"description": "unknown study"}})
def get_study(ctx: ContextDep, study_uid: StudyUID) -> StudyDetailOut:
    return study_out(ctx, monitoring.study_detail(ctx.ledger, study_uid))


_ACTION_RESPONSES: dict[int | str, dict[str, str]] = {
    404: {"description": "unknown study"}, 409: {"description": "the action does not apply to the study's state"},
    503: {"description": "the broker is unreachable"}}


@router.post("/{study_uid}/retry", response_model=ActionOut, responses=_ACTION_RESPONSES,
             dependencies=[Operate],
             summary="Re-enqueue the current stage of a failed or dead job")
def retry(ctx: ContextDep, study_uid: StudyUID, who: PrincipalDep) -> ActionOut:
    return ActionOut.model_validate(operations.retry_study(ctx.ledger, ctx.enqueue, study_uid, actor=who.username))


@router.post("/{study_uid}/replay", response_model=ActionOut, responses=_ACTION_RESPONSES,
             dependencies=[Operate],
             summary="Run the study again as a new job version from its stored instances")
def replay(ctx: ContextDep, study_uid: StudyUID, who: PrincipalDep) -> ActionOut:
    return ActionOut.model_validate(operations.replay_study(ctx.ledger, ctx.enqueue, study_uid,
                                                           ctx.router, actor=who.username))


@router.post("/{study_uid}/redeliver", response_model=RedeliverOut, responses=_ACTION_RESPONSES,
             dependencies=[Operate],
             summary="Dead-letter re-delivery of this study's dead job")
def redeliver(ctx: ContextDep, study_uid: StudyUID, who: PrincipalDep) -> RedeliverOut:
    done = operations.redeliver_dead(ctx.ledger, ctx.enqueue, study_uid=study_uid, actor=who.username)
    return RedeliverOut(redelivered=[ActionOut.model_validate(r) for r in done])
