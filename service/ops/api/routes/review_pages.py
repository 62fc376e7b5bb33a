"""The reviewer's pages of the dashboard (README "Review"): the worklist and one result's review page.

Signed-in users only (the session cookie; `viewer` and up may look, only a `reviewer` gets the Approve /
Reject buttons, which post to `/api/review/{job}/approve|reject` with the session's CSRF token). These
pages show accession number, modality, study date and description — an authenticated clinical tool may;
logs never do.
"""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from dicom_fusion.service.ops import review
from dicom_fusion.service.ops.api.deps import PERMISSIONS, ContextDep, DashboardUser
from dicom_fusion.service.ops.api.routes.dashboard import page_base
from dicom_fusion.service.ops.api.templating import templates
from dicom_fusion.service.ops.lesion_view import lesion_png
from dicom_fusion.service.storage.spool import Spool

router = APIRouter(tags=["review pages"], include_in_schema=False)
JobId = Annotated[int, Path(ge=1, le=2**62)]
MAX_LISTED = 200


def _sign_in(request: Request) -> Response:
    return RedirectResponse("/login?next=" + quote(request.url.path), status_code=status.HTTP_303_SEE_OTHER)


@router.get("/review", response_class=HTMLResponse)
def worklist_page(request: Request, ctx: ContextDep, user: DashboardUser) -> Response:
    if user is None:
        return _sign_in(request)
    items = review.worklist(ctx.ledger, ctx.settings)[:MAX_LISTED]
    details = [review.review_detail(ctx.ledger, ctx.settings, i.job_id) for i in items]
    return templates.TemplateResponse(request, "review_list.html",
                                      {**page_base(request, ctx, user), "items": details,
                                       "timeout_hours": ctx.settings.release.review_timeout_hours})


@router.get("/review/{job_id}", response_class=HTMLResponse)
def review_page(request: Request, ctx: ContextDep, user: DashboardUser, job_id: JobId) -> Response:
    if user is None:
        return _sign_in(request)
    detail = review.review_detail(ctx.ledger, ctx.settings, job_id)
    queue = [i.job_id for i in review.worklist(ctx.ledger, ctx.settings) if i.job_id != job_id]
    return templates.TemplateResponse(request, "review.html", {
        **page_base(request, ctx, user), "d": detail, "next_job": queue[0] if queue else None,
        "can_review": "review" in PERMISSIONS[user.role]})


@router.get("/review/{job_id}/overlay.png")
def overlay(request: Request, ctx: ContextDep, user: DashboardUser, job_id: JobId) -> Response:
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in")
    path = review.overlay_path(ctx.settings, job_id)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no Grad-CAM overlay for this job (model.explain off?)")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, no-store"})


@router.get("/review/{job_id}/lesion.png")
def lesion(request: Request, ctx: ContextDep, user: DashboardUser, job_id: JobId) -> Response:
    """The source image with the SEG's outline (`ops/lesion_view.py`); 404 without a segmented lesion."""
    if user is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in")
    png = lesion_png(Spool(ctx.settings.spool_dir, fsync=False).job_dir(job_id))
    if png is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no segmented lesion for this job")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})
