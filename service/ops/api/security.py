"""Security headers on every response of the API and dashboard (README "Security").

The dashboard is a same-origin page that shows clinical workflow state, so it must not be framed
(clickjacking), sniffed into another content type, leak its URLs through ``Referer``, or be kept in a
shared or proxy cache. Its Content-Security-Policy allows scripts only from this origin and the
dashboard's own inline blocks, by SHA-256 hash: an injected ``<script>`` never runs even if a template
ever failed to escape something. The hashes are computed once, from the template *sources* (never from
a response body, which is what an injection would change), so an inline block must be static: either
plain text or a single ``{% include "file" %}`` of a static file. Style attributes carry per-render
values (the throughput bars' heights), which no hash can cover: ``style-src-attr 'unsafe-inline'``
allows attributes only; ``<style>`` elements are hashed like scripts.

The headers are defaults: a response that sets one itself (the opt-in ``/docs`` pages, which load their
scripts from a CDN) keeps its own.
"""
from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, TemplateNotFound
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TEMPLATES = Path(__file__).resolve().parent / "templates"
_INLINE = re.compile(r"<(script|style)(\s[^>]*)?>(.*?)</\1\s*>", re.DOTALL | re.IGNORECASE)
_INCLUDE = re.compile(r"""^\{%-?\s*include\s+(["'])([^"']+)\1\s*-?%\}$""")
_DYNAMIC = re.compile(r"\{[{%#]")
_SRC = re.compile(r"\ssrc\s*=", re.IGNORECASE)


class InlineBlockError(ValueError):
    """An inline ``<script>``/``<style>`` whose text changes per render: no hash can allow it."""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _included(env: Environment, name: str, tag: str, included: str, body: str) -> str:
    """The text ``{% include %}`` puts in the block: the file's as Jinja renders it, with the block's
    own surrounding whitespace; refused when the file itself is a template (its text could vary)."""
    assert env.loader is not None
    try:
        source = env.loader.get_source(env, included)[0]
    except TemplateNotFound as exc:
        raise InlineBlockError(f"{name}: the <{tag}> block includes {included}, which is not in the "
                               "templates folder") from exc
    if _DYNAMIC.search(source):
        raise InlineBlockError(f"{name}: the <{tag}> block includes {included}, which uses template syntax; "
                               "keep included scripts and styles static so a CSP hash can allow them")
    lead, trail = body[:len(body) - len(body.lstrip())], body[len(body.rstrip()):]
    return lead + env.get_template(included).render() + trail


def inline_hashes(directory: Path = TEMPLATES) -> dict[str, list[str]]:
    """CSP hash sources of every inline ``<script>`` and ``<style>`` block in the templates under
    ``directory``: ``{"script": [...], "style": [...]}``, sorted and without duplicates.

    Raises :class:`InlineBlockError` naming the template when a block uses template syntax other than
    one ``{% include %}``: move its code into a static file (included, or served) instead.
    """
    env = Environment(loader=FileSystemLoader(str(directory)), autoescape=False)
    found: dict[str, set[str]] = {"script": set(), "style": set()}
    for path in sorted(directory.rglob("*.html")):
        name = path.relative_to(directory).as_posix()
        for match in _INLINE.finditer(path.read_text(encoding="utf-8")):
            tag, attrs, body = match.group(1).lower(), match.group(2) or "", match.group(3)
            if tag == "script" and _SRC.search(attrs):
                continue  # an external script from 'self': allowed by origin, nothing to hash
            include = _INCLUDE.match(body.strip())
            if include:
                body = _included(env, name, tag, include.group(2), body)
            elif _DYNAMIC.search(body):
                raise InlineBlockError(f"{name}: an inline <{tag}> uses template syntax, so its text changes per "
                                       "page and no CSP hash can allow it: move the code into a static file "
                                       f"and include it as the block's only content ({{% include \"x\" %}})")
            found[tag].add(_sha256(body))
    return {tag: sorted(hashes) for tag, hashes in found.items()}


def content_security_policy(hashes: Mapping[str, Iterable[str]]) -> str:
    """The dashboard's and API's policy: nothing but this origin and the hashed inline blocks."""
    scripts = " ".join(["'self'", *hashes.get("script", ())])
    styles = " ".join(["'self'", *hashes.get("style", ())])
    return "; ".join([
        "default-src 'none'",
        f"script-src {scripts}",
        f"style-src-elem {styles}",
        "style-src-attr 'unsafe-inline'",
        "style-src 'self' 'unsafe-inline'",  # only browsers without the -elem/-attr split (before 2022) read it
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ])


#: Swagger UI / ReDoc as FastAPI serves them (``api.docs = true``, development only): their
#: scripts, styles and fonts come from public CDNs and their pages hold an inline script.
DOCS_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net",
    "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com",
    "font-src https://fonts.gstatic.com",
    "img-src 'self' data: https://fastapi.tiangolo.com https://cdn.redoc.ly",
    "connect-src 'self'",
    "worker-src blob:",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])


def security_headers(csp: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on the sign-in form's
        # POST, which the login's cross-site check must refuse; same-origin still keeps URLs from other sites
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


class SecurityHeaders:
    """ASGI middleware: the headers of :func:`security_headers` on every HTTP response that does not set
    them itself; paths in ``overrides`` get their own Content-Security-Policy (the opt-in docs pages).

    Plain ASGI rather than ``BaseHTTPMiddleware``: it only edits the response start message, so
    streaming bodies and background tasks are untouched.
    """

    def __init__(self, app: ASGIApp, csp: str, overrides: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.headers = security_headers(csp)
        self.overrides = dict(overrides or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        defaults = self.headers
        override = self.overrides.get(scope.get("path", ""))
        if override is not None:
            defaults = {**defaults, "Content-Security-Policy": override}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in defaults.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
