"""Liveness and readiness; the only routes that answer without authentication.

``/readyz`` is polled by load balancers and Kubernetes, which send no token, so it answers everyone —
but with statuses only (check name, ok). Details (what answered, exception texts, the spool path, the
FHIR server, timings) go only to a caller with a valid token: they describe the network and may carry
what a peer echoed back. Probes are cached (:class:`~dicom_fusion.service.ops.readiness.CachedReadiness`,
``api.readiness_cache_seconds``) so no call rate turns ``/readyz`` into a load on the EHR or the PACS.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from dicom_fusion.service.ops.api.deps import ContextDep, _bearer, current_principal
from dicom_fusion.service.ops.api.schemas import HealthOut
from dicom_fusion.service.ops.readiness import CachedReadiness
from dicom_fusion.service.storage.users import Principal

router = APIRouter(tags=["health"])


class CheckStatusOut(BaseModel):
    """One dependency: its name and whether it answered; ``detail`` and ``seconds`` only with a token."""

    model_config = ConfigDict(frozen=True)
    name: str
    ok: bool
    detail: str | None = Field(None, description="what answered, or why not (with a token only)")
    seconds: float | None = Field(None, description="how long the check took (with a token only)")


class ReadinessOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    ready: bool
    checks: list[CheckStatusOut]
    age_seconds: float | None = Field(None, description="age of the cached probe (with a token only)")


def readiness_cache(request: Request) -> CachedReadiness:
    """The app's probe cache (made once by ``create_app``: concurrent first calls share it)."""
    cache: CachedReadiness = request.app.state.readiness
    return cache


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def optional_principal(request: Request, ctx: ContextDep, cred: Bearer) -> Principal | None:
    """The caller when it shows valid credentials; None (not a 401) otherwise: /readyz answers everyone."""
    try:
        return current_principal(request, ctx, cred)
    except HTTPException:
        return None


@router.get("/healthz", response_model=HealthOut, summary="The API process is up")
def healthz() -> HealthOut:
    return HealthOut(status="ok")


@router.get("/readyz", response_model=ReadinessOut, response_model_exclude_none=True,
            summary="Ledger, broker, spool, PACS (C-ECHO) and FHIR, each with its own status; 503 when any "
                    "is down. Without a token: names and ok only. Probed at most once per "
                    "api.readiness_cache_seconds.",
            responses={503: {"model": ReadinessOut, "description": "a dependency is down"}})
def readyz(response: Response, cache: Annotated[CachedReadiness, Depends(readiness_cache)],
           who: Annotated[Principal | None, Depends(optional_principal)]) -> ReadinessOut:
    result = cache.get()
    if not result.ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    if who is None:
        return ReadinessOut(ready=result.ready,
                            checks=[CheckStatusOut(name=c.name, ok=c.ok) for c in result.checks])
    return ReadinessOut(ready=result.ready, age_seconds=round(cache.age(result), 3),
                        checks=[CheckStatusOut(name=c.name, ok=c.ok, detail=c.detail, seconds=c.seconds)
                                for c in result.checks])
