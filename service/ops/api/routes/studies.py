"""Studies: list, drill-down, and the operator actions retry / replay / redeliver."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query

from dicom_fusion.service.ops import monitoring, operations
from dicom_fusion.service.ops.api.deps import ApiContext, Authorized, ContextDep, Operate
from dicom_fusion.service.ops.api.schemas import ActionOut, JobOut, RedeliverOut, StudyDetailOut, StudyPageOut

router = APIRouter(prefix="/api/studies", tags=["studies"], dependencies=[Authorized])
StudyUID = Annotated[str, Path(pattern=r"^[0-9][0-9.]{0,63}$", description="Study Instance UID")]
_STATES = "|".join(monitoring.STUDY_STATES)


@router.get("", response_model=StudyPageOut, summary="Studies, most recent first, paged")
def list_studies(
    ctx: ContextDep,
    state: Annotated[str | None, Query(pattern=f"^({_STATES})$",
                                       description="receiving, or the state of the latest job")] = None,
    received_after: Annotated[datetime | None, Query(description="last instance at or after (UTC)")] = None,
    received_before: Annotated[datetime | None, Query(description="last instance before (UTC)")] = None,
    page: Annotated[int, Query(ge=1)] = 1,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
) -> StudyPageOut:
    result = monitoring.list_studies(ctx.ledger, state=state, received_after=_naive(received_after),
                                     received_before=_naive(received_before), page=page, page_size=page_size)
    return StudyPageOut.model_validate(result)


def _naive(ts: datetime | None) -> datetime | None:
    """The ledger stores naive UTC."""
    if ts is None or ts.tzinfo is None:
        return ts
    from datetime import UTC

    return ts.astimezone(UTC).replace(tzinfo=None)


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
def retry(ctx: ContextDep, study_uid: StudyUID) -> ActionOut:
    return ActionOut.model_validate(operations.retry_study(ctx.ledger, ctx.enqueue, study_uid))


@router.post("/{study_uid}/replay", response_model=ActionOut, responses=_ACTION_RESPONSES,
             dependencies=[Operate],
             summary="Run the study again as a new job version from its stored instances")
def replay(ctx: ContextDep, study_uid: StudyUID) -> ActionOut:
    return ActionOut.model_validate(operations.replay_study(ctx.ledger, ctx.enqueue, study_uid,
                                                           ctx.router))


@router.post("/{study_uid}/redeliver", response_model=RedeliverOut, responses=_ACTION_RESPONSES,
             dependencies=[Operate],
             summary="Dead-letter re-delivery of this study's dead job")
def redeliver(ctx: ContextDep, study_uid: StudyUID) -> RedeliverOut:
    done = operations.redeliver_dead(ctx.ledger, ctx.enqueue, study_uid=study_uid)
    return RedeliverOut(redelivered=[ActionOut.model_validate(r) for r in done])
