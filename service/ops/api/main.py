"""App factory and runner of the REST API + dashboard (``dicom-fusion api``)."""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import ConfigError
from dicom_fusion.service.jobs.queues import make_celery
from dicom_fusion.service.ops.api.deps import ApiContext
from dicom_fusion.service.ops.api.docs import install_docs
from dicom_fusion.service.ops.api.routes import (
    dashboard,
    dicomweb,
    health,
    me,
    metrics,
    model_cards,
    queues,
    review,
    review_pages,
    routing,
    session,
    studies,
)
from dicom_fusion.service.ops.api.routes.errors import install_error_handler
from dicom_fusion.service.ops.api.security import SecurityHeaders, content_security_policy, inline_hashes
from dicom_fusion.service.ops.logredact import RedactQuerySecrets
from dicom_fusion.service.ops.metrics import api_registry
from dicom_fusion.service.ops.readiness import CachedReadiness
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.schema import check_schema

DESCRIPTION = """Operate dicom-fusion: queues, studies, job history, retries, replays, dead letters, metrics, the models served.

Every route except `/healthz` and `/readyz` needs `Authorization: Bearer <token>`: a named user's API
token (`dicom-fusion users token`; the user's role — viewer, reviewer, operator, admin, sender — decides what it
may do) or the service token `api.token` (`DICOM_FUSION_API__TOKEN`), an operator for automation. Responses carry UIDs, states, counts and reasons: never patient data.
"""


def check_api_settings(settings: Settings) -> Settings:
    """Settings with ``api.token`` read from ``api.token_file`` when set; refuses to serve with
    authentication on and no token (:class:`ConfigError`)."""
    api = settings.api
    if api.token_file is not None:
        try:
            api = api.model_copy(update={"token": api.token_file.read_text().strip()})
        except OSError as exc:
            raise ConfigError(f"cannot read api.token_file {api.token_file}: {exc.strerror}") from exc
    if api.auth and not api.token.strip():
        raise ConfigError("api.token is empty while api.auth is on: set DICOM_FUSION_API__TOKEN=<a long random "
                          "secret> (or token / token_file under [api] in the config file); api.auth = false "
                          "turns authentication off (development only)")
    return settings.model_copy(update={"api": api})


def create_app(settings: Settings) -> FastAPI:
    """Build the app; raises :class:`ConfigError` when the settings are unsafe to serve."""
    settings = check_api_settings(settings)
    ledger = Ledger(settings.ledger_url)
    ctx = ApiContext(settings=settings, ledger=ledger, celery=make_celery(settings),
                     registry=api_registry(ledger, settings))

    stow = dicomweb.make_ingest(settings, ledger) if settings.dicomweb.enabled else None  # STOW-RS

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if stow is not None:
            stow.stop()  # commits what is waiting
        ledger.close()

    # no CDN-loaded docs pages, /openapi.json behind the token unless api.docs (service/ops/api/docs.py)
    app = FastAPI(title="dicom-fusion", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.state.stow = stow
    app.state.readiness = CachedReadiness(ledger, settings, ttl=settings.api.readiness_cache_seconds)
    docs_policies = install_docs(app, settings)
    app.add_middleware(SecurityHeaders, csp=content_security_policy(inline_hashes()), overrides=docs_policies)
    install_error_handler(app)
    for module in (health, studies, queues, review, me, routing, metrics, session, dashboard, review_pages,
                   model_cards):
        app.include_router(module.router)
    if stow is not None:
        app.include_router(dicomweb.router)
    return app


class _RedactToken(RedactQuerySecrets):
    """Access logs must not record the dashboard's ``?token=``, however its name is encoded (``?tok%65n=``):
    parameters are matched by decoded name (`service/ops/logredact.py`)."""


def run(settings: Settings) -> None:
    """Serve the API with uvicorn on ``api.host:api.port`` until interrupted."""
    import uvicorn

    check_schema(settings.ledger_url)  # SchemaError unless the ledger is at head: `dicom-fusion db upgrade`
    app = create_app(settings)
    logging.getLogger("uvicorn.access").addFilter(_RedactToken())
    print(f"dicom-fusion api on http://{settings.api.host}:{settings.api.port} "
          f"(dashboard /dashboard{', docs /docs' if settings.api.docs else ''})", flush=True)
    uvicorn.run(app, host=settings.api.host, port=settings.api.port, log_level=settings.log_level.lower(),
                log_config=None)
