"""Prometheus exposition of the ledger-derived metrics (see :mod:`dicom_fusion.service.ops.metrics`)."""
from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dicom_fusion.service.ops.api.deps import Authorized, ContextDep

router = APIRouter(tags=["metrics"], dependencies=[Authorized])


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(ctx: ContextDep) -> Response:
    return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)
