"""Liveness and readiness; the only routes without authentication."""
from __future__ import annotations

from fastapi import APIRouter, Response, status

from dicom_fusion.service.ops.api.deps import ContextDep
from dicom_fusion.service.ops.api.schemas import CheckOut, HealthOut, ReadyOut
from dicom_fusion.service.ops.readiness import readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="The API process is up")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadyOut, summary="Ledger, broker, spool, PACS (C-ECHO) and FHIR, "
            "each with its own status; 503 when any is down",
            responses={503: {"model": ReadyOut, "description": "a dependency is down"}})
def readyz(ctx: ContextDep, response: Response) -> ReadyOut:
    checks = readiness(ctx.ledger, ctx.settings)
    ready = all(c.ok for c in checks)
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return ReadyOut(ready=ready, checks=[CheckOut.model_validate(c) for c in checks])
