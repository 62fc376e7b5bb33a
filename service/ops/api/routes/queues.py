"""Queues, the activity overview, and the dead-letter list."""
from __future__ import annotations

from fastapi import APIRouter

from dicom_fusion.service.ops import monitoring, operations
from dicom_fusion.service.ops.api.deps import ApiContext, Authorized, ContextDep, Operate, PrincipalDep
from dicom_fusion.service.ops.api.schemas import ActionOut, FailureOut, OverviewOut, QueuesOut, RedeliverOut

router = APIRouter(prefix="/api", tags=["queues"], dependencies=[Authorized])


def queues_out(ctx: ApiContext, ov: monitoring.QueueOverview) -> QueuesOut:
    return QueuesOut.model_validate(ov).model_copy(update={"workers": ctx.workers()})


@router.get("/queues", response_model=QueuesOut,
            summary="Per queue: messages in the broker, jobs waiting and in flight (ledger), oldest waiting; "
                    "workers answering a ping (Redis broker)")
def queues(ctx: ContextDep) -> QueuesOut:
    return queues_out(ctx, monitoring.queue_overview(ctx.ledger, ctx.settings))


@router.get("/overview", response_model=OverviewOut,
            summary="What the dashboard shows: queues, studies by state, last hour's throughput and latency, "
                    "recent failures")
def overview(ctx: ContextDep) -> OverviewOut:
    ov = monitoring.overview(ctx.ledger, ctx.settings)
    return OverviewOut.model_validate(ov).model_copy(update={"queues": queues_out(ctx, ov.queues)})


@router.get("/dead-letter", response_model=list[FailureOut], summary="Dead jobs, newest first")
def dead_letter(ctx: ContextDep) -> list[FailureOut]:
    return [FailureOut.model_validate(f) for f in monitoring.dead_jobs(ctx.ledger)]


@router.post("/dead-letter/redeliver", response_model=RedeliverOut, dependencies=[Operate],
             summary="Re-deliver every dead job: back to the stage it died at, fresh retry budget",
             responses={503: {"description": "the broker is unreachable"}})
def redeliver_all(ctx: ContextDep, who: PrincipalDep) -> RedeliverOut:
    done = operations.redeliver_dead(ctx.ledger, ctx.enqueue, actor=who.username)
    return RedeliverOut(redelivered=[ActionOut.model_validate(r) for r in done])
