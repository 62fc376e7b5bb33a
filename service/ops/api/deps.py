"""Typed dependencies of the API routes: the per-app context (settings, ledger, Celery) and the token check.

Authentication: every route except ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <token>``
unless ``api.auth = false``: a named user's API token (``dicom-fusion users token``; the user's role decides
what it may do, see :data:`PERMISSIONS`) or ``api.token``, the service token, which acts as an operator
for automation. Browsers sign in instead (``/login``, :mod:`.routes.session`): an HttpOnly, SameSite=Strict
session cookie, and a CSRF token the dashboard's script sends with every state-changing request.
"""
from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import urlsplit

from celery import Celery
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import BrokerError
from dicom_fusion.service.jobs.queues import enqueue
from dicom_fusion.service.ops.broker import workers_online
from dicom_fusion.service.ops.operations import make_router
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Role, RouteStudy, Stage
from dicom_fusion.service.storage.users import Principal, Users

WORKERS_TTL = 10.0


@dataclass
class ApiContext:
    """Everything the routes share, built once per app by :func:`~.main.create_app`."""

    settings: Settings
    ledger: Ledger
    celery: Celery
    registry: CollectorRegistry
    _workers: tuple[float, list[str] | None] = field(default=(0.0, None))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _router: RouteStudy | None = None

    @property
    def router(self) -> RouteStudy:
        """The routing a replay goes through, built on first use (a RouteError names the bad route)."""
        if self._router is None:
            self._router = make_router(self.ledger, self.settings)
        return self._router

    def enqueue(self, job_id: int, stage: Stage, requeue: bool) -> None:
        try:
            enqueue(self.celery, self.ledger, self.settings, job_id, stage, requeue=requeue)
        except BrokerError:
            raise
        except Exception as exc:  # kombu/redis connection errors: the reaper re-enqueues later
            raise BrokerError(f"could not publish to the broker ({type(exc).__name__}: {exc}); the lease "
                              "reaper re-enqueues the job once its queued lease expires") from exc

    def workers(self) -> list[str] | None:
        """Workers answering a ping, cached a few seconds (a ping waits for replies)."""
        with self._lock:
            stamp, names = self._workers
            if time.monotonic() - stamp < WORKERS_TTL:
                return names
            try:
                names = workers_online(self.celery)
            except BrokerError:
                names = None
            self._workers = (time.monotonic(), names)
            return names


def get_context(request: Request) -> ApiContext:
    ctx: ApiContext = request.app.state.ctx
    return ctx


ContextDep = Annotated[ApiContext, Depends(get_context)]
_bearer = HTTPBearer(auto_error=False, description="a user's API token (dfu_…), or api.token (the service token)")

#: What each role may do (README "Users and roles"). `read`: every GET; `review`: approve / reject;
#: `operate`: retry, replay, redeliver; `users`: manage users; `store`: STOW-RS (`/dicomweb/studies`).
#: Operators and admins may store too (the service token is an operator: automation pushes studies).
PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.VIEWER: frozenset({"read"}),
    Role.REVIEWER: frozenset({"read", "review"}),
    Role.OPERATOR: frozenset({"read", "operate", "store"}),
    Role.ADMIN: frozenset({"read", "operate", "users", "store"}),
    Role.SENDER: frozenset({"store"}),
}
#: The service token `api.token`: automation (scripts, Prometheus), an operator.
SERVICE = Principal("service", "service token (api.token)", Role.OPERATOR)
#: `api.auth = false` (development only): everything is allowed.
ANONYMOUS = Principal("anonymous", "anonymous (api.auth = false)", Role.ADMIN)


def _principal(ctx: ApiContext, token: str | None) -> Principal | None:
    if not token:
        return None
    if ctx.settings.api.token and secrets.compare_digest(token.encode(), ctx.settings.api.token.encode()):
        return SERVICE
    return Users(ctx.ledger).resolve_token(token)


SESSION_COOKIE = "dfu_session"
CSRF_HEADER = "X-CSRF-Token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _unauthorized() -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in, or send a bearer token (a user's API token or "
                         "api.token)", headers={"WWW-Authenticate": "Bearer"})


def session_of(request: Request, ctx: ApiContext) -> tuple[Principal, str] | None:
    """The dashboard session of the request's cookie: (user, CSRF token), or None."""
    cookie = request.cookies.get(SESSION_COOKIE)
    return Users(ctx.ledger).resolve_session(cookie) if cookie else None


def proxy_user(request: Request, ctx: ApiContext) -> Principal | None:
    """The user an authenticating reverse proxy names in `api.trusted_user_header` — only when the request
    comes from one of `api.trusted_proxies` (anyone else could set that header)."""
    header = ctx.settings.api.trusted_user_header
    if not header or request.client is None or request.client.host not in ctx.settings.api.trusted_proxies:
        return None
    name = request.headers.get(header, "").strip()
    return Users(ctx.ledger).active_user(name) if name else None


def same_origin(request: Request) -> bool:
    """The request's Origin is this site (or absent: not a browser, or a same-origin navigation). An opaque
    origin (`null`: a sandboxed frame, a file, a privacy redirect) is not this site."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    o, here = urlsplit(origin), request.url
    default = {"https": 443, "http": 80}
    return origin != "null" and (o.scheme, o.hostname, o.port or default.get(o.scheme)) == (
        here.scheme, here.hostname, here.port or default.get(here.scheme))


def current_principal(request: Request, ctx: ContextDep,
                      cred: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Principal:
    """Who calls: a bearer token (API clients), else the dashboard's session cookie — whose state-changing
    requests must carry the session's CSRF token in `X-CSRF-Token` (403 otherwise); 401 with neither
    (unless `api.auth = false`)."""
    if not ctx.settings.api.auth:
        return ANONYMOUS
    if cred is not None:
        who = _principal(ctx, cred.credentials)
        if who is None:
            raise _unauthorized()
        return who
    signed_in = session_of(request, ctx)
    if signed_in is None:
        via_proxy = proxy_user(request, ctx)
        if via_proxy is None:
            raise _unauthorized()
        if request.method not in _SAFE_METHODS and not same_origin(request):  # the proxy's SSO cookie rides along
            raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-site request refused")
        return via_proxy
    who, csrf = signed_in
    if request.method not in _SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not sent or not secrets.compare_digest(sent.encode(), csrf.encode()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"missing or wrong {CSRF_HEADER} header: reload the page")
    return who


PrincipalDep = Annotated[Principal, Depends(current_principal)]


def require(permission: str) -> Any:
    """A dependency that lets through only callers whose role has ``permission`` (403 otherwise)."""

    def check(who: PrincipalDep) -> Principal:
        if permission not in PERMISSIONS[who.role]:
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"{who.username} is a {who.role}; this needs the "
                                f"{permission!r} permission (roles: README \"Users and roles\")")
        return who

    return Depends(check)


def dashboard_user(request: Request, ctx: ContextDep) -> Principal | None:
    """The dashboard's pages: the signed-in user (None: show the sign-in form). No token travels in a URL."""
    if not ctx.settings.api.auth:
        return ANONYMOUS
    signed_in = session_of(request, ctx)
    who = signed_in[0] if signed_in else proxy_user(request, ctx)
    if who is not None and "read" not in PERMISSIONS[who.role]:  # a sender stores over STOW-RS, reads nothing
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"{who.username} is a {who.role}: no dashboard")
    return who


Authorized = require("read")
StorePermission = require("store")
Operate = require("operate")
ReviewPermission = require("review")
DashboardUser = Annotated[Principal | None, Depends(dashboard_user)]
