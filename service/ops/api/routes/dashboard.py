"""The operator dashboard: server-rendered HTML (Jinja2) plus a small script for live refresh.

``/dashboard`` renders the whole page with the current numbers; the script then re-fetches the
``/dashboard/fragments/*`` pieces every ``api.refresh_seconds`` and swaps them in, so every number
on screen has one renderer (the templates). Without a valid token the page is a login form.
"""
from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dicom_fusion.service.errors import StudyNotFoundError
from dicom_fusion.service.ops import monitoring
from dicom_fusion.service.ops.api.deps import ApiContext, Authorized, ContextDep, DashboardAuth
from dicom_fusion.service.ops.api.routes.queues import queues_out
from dicom_fusion.service.ops.api.routes.studies import StudyUID, study_out
from dicom_fusion.service.storage.models import utcnow

router = APIRouter(tags=["dashboard"], include_in_schema=False)
templates = Jinja2Templates(directory=Path(__file__).resolve().parent.parent / "templates")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds // 60:.0f} m {seconds % 60:02.0f} s"
    return f"{seconds / 3600:.1f} h"


def _ago(ts: datetime | None, now: datetime) -> str:
    return "–" if ts is None else f"{_duration(max((now - ts).total_seconds(), 0.0))} ago"


def _short_uid(uid: str) -> str:
    """Long UIDs in narrow columns: head…tail (the full UID is in the title and the drill-down)."""
    return uid if len(uid) <= 26 else f"{uid[:10]}…{uid[-12:]}"


templates.env.filters["duration"] = _duration
templates.env.filters["short_uid"] = _short_uid
templates.env.globals["ago"] = _ago


def _overview_context(ctx: ApiContext) -> dict[str, Any]:
    ov = monitoring.overview(ctx.ledger, ctx.settings)
    peak = max([1] + [b.instances for b in ov.throughput])
    peak_jobs = max([1] + [b.done + b.dead for b in ov.throughput])
    return {"ov": ov, "queues": queues_out(ctx, ov.queues), "now": ov.generated_at, "peak": peak,
            "peak_jobs": peak_jobs, "settings": ctx.settings}


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
def dashboard(request: Request, ctx: ContextDep, authorized: DashboardAuth,
              study: Annotated[str | None, Query(pattern=r"^[0-9][0-9.]{0,63}$")] = None) -> Response:
    base = {"refresh": ctx.settings.api.refresh_seconds, "auth": ctx.settings.api.auth}
    if not authorized:
        wrong = "token" in request.query_params
        return templates.TemplateResponse(request, "login.html", {**base, "wrong": wrong}, status_code=401)
    page = {**base, **_overview_context(ctx), "selected": study}
    if study:
        page.update(_study_context(ctx, study))
    return templates.TemplateResponse(request, "dashboard.html", page)


@router.get("/dashboard/fragments/overview", response_class=HTMLResponse, dependencies=[Authorized])
def overview_fragment(request: Request, ctx: ContextDep) -> Response:
    return templates.TemplateResponse(request, "_overview.html", _overview_context(ctx))


@router.get("/dashboard/fragments/study/{study_uid}", response_class=HTMLResponse, dependencies=[Authorized])
def study_fragment(request: Request, ctx: ContextDep, study_uid: StudyUID) -> Response:
    page = _study_context(ctx, study_uid)
    return templates.TemplateResponse(request, "_study.html", page, status_code=200 if page["study"] else 404)
