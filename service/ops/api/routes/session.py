"""Dashboard sign-in and sign-out (README "Users and roles").

A browser posts username and password to ``/login``; a good pair starts a session (:class:`Users`): an
HttpOnly, SameSite=Strict cookie holding a random id (Secure over https), lasting ``api.session_hours``.
Wrong passwords are audited and, after five in a row, slowed down (`storage/users.py`). The sign-in form
itself is protected against cross-site posting by SameSite and an Origin check.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from dicom_fusion.service.ops.api.deps import SESSION_COOKIE, ContextDep, PrincipalDep, same_origin, session_of
from dicom_fusion.service.ops.api.templating import templates
from dicom_fusion.service.storage.users import SignInError, Users

router = APIRouter(tags=["session"], include_in_schema=False)


def _safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this site only (never another host)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\\\" not in target:
        return target
    return "/dashboard"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, ctx: ContextDep, next: str | None = None) -> Response:  # noqa: A002
    if session_of(request, ctx) is not None:
        return RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    return templates.TemplateResponse(request, "login.html", {"error": None, "next": _safe_next(next),
                                                             "refresh": ctx.settings.api.refresh_seconds})


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, ctx: ContextDep, username: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=1024)],
          next: Annotated[str, Form(max_length=512)] = "/dashboard") -> Response:  # noqa: A002
    if not same_origin(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "sign-in form posted from another site")
    users = Users(ctx.ledger)
    try:
        who = users.authenticate(username, password)
    except SignInError as exc:
        return templates.TemplateResponse(request, "login.html", {"error": str(exc), "next": _safe_next(next),
                                                                 "refresh": ctx.settings.api.refresh_seconds},
                                          status_code=status.HTTP_401_UNAUTHORIZED)
    cookie, _ = users.start_session(who.username, hours=ctx.settings.api.session_hours)
    response = RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    secure = ctx.settings.api.cookie_secure == "always" or request.url.scheme == "https"
    response.set_cookie(SESSION_COOKIE, cookie, max_age=int(ctx.settings.api.session_hours * 3600), path="/",
                        httponly=True, samesite="strict", secure=secure)
    return response


@router.post("/logout")
def logout(request: Request, ctx: ContextDep, _: PrincipalDep) -> Response:
    """Sign out (a state-changing request: the CSRF header is checked by the principal dependency)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        Users(ctx.ledger).end_session(cookie)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
