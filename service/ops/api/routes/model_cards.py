"""The models this deployment serves, per model card (README "Read the dashboard": Models): `GET /api/models`
(JSON, any role that reads) and the dashboard's `/models` page (signed-in users), both from the read model
`ops/served_models.py`.

The page shows each card's routes, name, version, intended use, threshold and calibration, then the card as
a document (`dicom-fusion model card`), escaped; a card that cannot be read shows its error instead.
"""
from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicom_fusion.service.ops.api.deps import Authorized, ContextDep, DashboardUser
from dicom_fusion.service.ops.api.routes.dashboard import page_base
from dicom_fusion.service.ops.api.schemas import ServedModelsOut
from dicom_fusion.service.ops.api.templating import templates
from dicom_fusion.service.ops.served_models import served_models

router = APIRouter(tags=["models"])


@router.get("/api/models", response_model=ServedModelsOut, dependencies=[Authorized],
            summary="The model cards the route table names: routes, name, version, intended use, threshold, "
                    "calibration and the card as a document; an unreadable card with its error")
def models(ctx: ContextDep) -> ServedModelsOut:
    return ServedModelsOut.model_validate(served_models(ctx.settings))


@router.get("/models", response_class=HTMLResponse, include_in_schema=False)
def models_page(request: Request, ctx: ContextDep, user: DashboardUser) -> Response:
    if user is None:
        return RedirectResponse("/login?next=" + quote(request.url.path), status_code=status.HTTP_303_SEE_OTHER)
    return templates.TemplateResponse(request, "models.html",
                                      {**page_base(request, ctx, user), "served": served_models(ctx.settings)})
