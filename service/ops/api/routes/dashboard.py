"""The operator dashboard: server-rendered HTML (Jinja2) plus a small script for live refresh.

``/dashboard`` renders the whole page with the current numbers; the script then re-fetches the
``/dashboard/fragments/*`` pieces every ``api.refresh_seconds`` and swaps them in, so every number
on screen has one renderer (the templates). Without a valid token the page is a login form.
"""
from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicom_fusion.service.errors import StudyNotFoundError
from dicom_fusion.service.ops import monitoring
from dicom_fusion.service.ops.api.deps import ApiContext, Authorized, ContextDep, DashboardUser, session_of
from dicom_fusion.service.ops.api.routes.queues import queues_out
from dicom_fusion.service.ops.api.routes.studies import StudyUID, study_out
from dicom_fusion.service.ops.api.templating import templates
from dicom_fusion.service.ops.drift import model_drift
from dicom_fusion.service.routing.reload import read_status
from dicom_fusion.service.storage.models import utcnow

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def _overview_context(ctx: ApiContext) -> dict[str, Any]:
    ov = monitoring.overview(ctx.ledger, ctx.settings)
    peak = max([1] + [b.instances for b in ov.throughput])
    peak_jobs = max([1] + [b.done + b.dead for b in ov.throughput])
    return {"ov": ov, "queues": queues_out(ctx, ov.queues), "now": ov.generated_at, "peak": peak,
            "peak_jobs": peak_jobs, "settings": ctx.settings, "routes": read_status(ctx.settings.data_dir),
            "drift": model_drift(ctx.ledger, ctx.settings)}


def _study_context(ctx: ApiContext, study_uid: str) -> dict[str, Any]:
    try:
        return {"study": study_out(ctx, monitoring.study_detail(ctx.ledger, study_uid)), "now": utcnow(),
                "missing": None}
    except StudyNotFoundError:
        return {"study": None, "missing": study_uid, "now": utcnow()}


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard(request: Request, ctx: ContextDep, user: DashboardUser,
              study: Annotated[str | None, Query(pattern=r"^[0-9][0-9.]{0,63}$")] = None) -> Response:
    if user is None:
        return RedirectResponse("/login?next=" + quote(str(request.url.path) + (f"?study={study}" if study else "")),
                                status_code=303)
    page = {**page_base(request, ctx, user), **_overview_context(ctx), "selected": study}
    if study:
        page.update(_study_context(ctx, study))
    return templates.TemplateResponse(request, "dashboard.html", page)


def page_base(request: Request, ctx: ApiContext, user: Any) -> dict[str, Any]:
    """What base.html needs on every signed-in page: refresh period, the user, the session's CSRF token."""
    signed_in = session_of(request, ctx)
    return {"refresh": ctx.settings.api.refresh_seconds, "auth": ctx.settings.api.auth, "user": user,
            "csrf": signed_in[1] if signed_in else ""}


@router.get("/dashboard/fragments/overview", response_class=HTMLResponse, dependencies=[Authorized])
def overview_fragment(request: Request, ctx: ContextDep) -> Response:
    return templates.TemplateResponse(request, "_overview.html", _overview_context(ctx))


@router.get("/dashboard/fragments/study/{study_uid}", response_class=HTMLResponse, dependencies=[Authorized])
def study_fragment(request: Request, ctx: ContextDep, study_uid: StudyUID) -> Response:
    page = _study_context(ctx, study_uid)
    return templates.TemplateResponse(request, "_study.html", page, status_code=200 if page["study"] else 404)
