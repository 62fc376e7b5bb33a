"""The OpenAPI document, and the interactive docs pages only where asked for (``api.docs``).

FastAPI's ``/docs`` (Swagger UI) and ``/redoc`` load their scripts, styles and fonts from public CDNs,
which a hospital network usually cannot reach and which would run third-party code next to the
dashboard's session. Bundling was considered: ``swagger-ui-bundle`` 1.1.0 (the PyPI package that ships
the assets) carries Swagger UI 4.15.5 of 2022 and no ReDoc, a frozen copy of a large script we would
then have to keep patched ourselves; and a browser cannot send the bearer token on navigation. So the
pages are off by default. The
document itself stays available to API clients and tools: ``GET /openapi.json`` with a token (any role).
``api.docs = true`` (development only) serves FastAPI's own pages and ``/openapi.json`` without a token,
with a Content-Security-Policy that allows those CDNs on those pages only.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ops.api.deps import Authorized
from dicom_fusion.service.ops.api.security import DOCS_POLICY

OPENAPI = "/openapi.json"
DOCS_PAGES = ("/docs", "/docs/oauth2-redirect", "/redoc")


def install_docs(app: FastAPI, settings: Settings) -> dict[str, str]:
    """Add ``/openapi.json`` (token needed unless ``api.docs``) and, with ``api.docs``, the docs pages.

    The app must be built with ``docs_url=None, redoc_url=None, openapi_url=None``. Returns the
    Content-Security-Policy of each docs page (empty when they are off) for :class:`.SecurityHeaders`.
    """
    if not settings.api.docs:
        @app.get(OPENAPI, include_in_schema=False, dependencies=[Authorized])
        def openapi_document() -> JSONResponse:
            return JSONResponse(app.openapi())

        return {}

    @app.get(OPENAPI, include_in_schema=False)
    def open_openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI, title=f"{app.title} - Swagger UI",
                                   oauth2_redirect_url="/docs/oauth2-redirect")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=OPENAPI, title=f"{app.title} - ReDoc")

    pages: dict[str, Any] = {path: DOCS_POLICY for path in DOCS_PAGES}
    return pages
