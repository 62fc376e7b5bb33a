"""Clinical review over the API (README "Review"): the worklist, approve and reject.

Approve / reject need the `review` permission (a user with the role `reviewer`); the reviewer named in
the SR and the report is the signed-in user's display name and organisation, never a name the request
body claims. The service token (an operator) cannot approve.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, ConfigDict, Field

from dicom_fusion.service.ops import review
from dicom_fusion.service.ops.api.deps import Authorized, ContextDep, ReviewPermission
from dicom_fusion.service.ops.api.schemas import schema_of
from dicom_fusion.service.storage.models import ReviewVerdict
from dicom_fusion.service.storage.users import Principal

router = APIRouter(prefix="/api/review", tags=["review"])
JobId = Annotated[int, Path(ge=1, le=2**62, description="job id (from the worklist)")]
ReviewItemOut = schema_of(review.ReviewItem, "ReviewItemOut", properties=("indeterminate",))
ReviewOut = schema_of(review.ReviewResult, "ReviewOut")


class ApproveIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    finding: str | None = Field(None, max_length=128, description="a class name of the model, if you find "
                                "another than the model did")
    comment: str = Field("", max_length=review.MAX_COMMENT)
    model: str | None = Field(None, max_length=200, description="\"name version\" of the model whose result "
                              "you reviewed; refused if the job's result comes from another")


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str = Field("", max_length=review.MAX_COMMENT)
    model: str | None = Field(None, max_length=200)


_RESPONSES: dict[int | str, dict[str, str]] = {
    403: {"description": "the caller is not a reviewer"}, 404: {"description": "unknown job"},
    409: {"description": "the job is not awaiting review, or the request does not fit its result"}}


@router.get("", response_model=list[ReviewItemOut], dependencies=[Authorized],
            summary="Results awaiting review, oldest first (overdue past release.review_timeout_hours)")
def worklist(ctx: ContextDep) -> list[ReviewItemOut]:  # type: ignore[valid-type]
    return [ReviewItemOut.model_validate(i) for i in review.worklist(ctx.ledger, ctx.settings)]


def _decide(ctx: ContextDep, who: Principal, job_id: int, verdict: ReviewVerdict, comment: str,
            finding: str | None, model: str | None) -> ReviewOut:  # type: ignore[valid-type]
    result = review.decide(ctx.ledger, ctx.settings, ctx.enqueue, job_id, verdict=verdict,
                           reviewer=who.display_name, organization=who.organization, comment=comment,
                           finding=finding, expected_model=model)
    return ReviewOut.model_validate(result)


@router.post("/{job_id}/approve", response_model=ReviewOut, responses=_RESPONSES,
             summary="Approve: the SR goes VERIFIED with your name, the report becomes final")
def approve(ctx: ContextDep, job_id: JobId, who: Principal = ReviewPermission,
            body: Annotated[ApproveIn, Body()] = ApproveIn()) -> ReviewOut:  # type: ignore[valid-type]
    return _decide(ctx, who, job_id, ReviewVerdict.APPROVED, body.comment, body.finding, body.model)


@router.post("/{job_id}/reject", response_model=ReviewOut, responses=_RESPONSES,
             summary="Reject: nothing goes to the PACS; a preliminary report is marked entered-in-error")
def reject(ctx: ContextDep, job_id: JobId, who: Principal = ReviewPermission,
           body: Annotated[RejectIn, Body()] = RejectIn()) -> ReviewOut:  # type: ignore[valid-type]
    return _decide(ctx, who, job_id, ReviewVerdict.REJECTED, body.comment, None, body.model)
