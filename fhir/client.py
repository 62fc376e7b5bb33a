"""A small synchronous FHIR R4 REST client (httpx): read, search with paging, transaction.

Why our own and not a generic FHIR library: the service needs exactly four interactions, and it needs them
to behave predictably in a worker — bounded retries with backoff that honour the server's Retry-After,
one exception hierarchy (`errors.py`) the task layer maps to job states, OAuth2 client-credentials with a
cached token, and logs that never contain patient data or credentials.

Logging: this module logs resource types, counts, statuses and timings only. Search URLs carry patient
identifiers, so they are never logged here; note that httpx itself logs every request URL at INFO on the
"httpx" logger — the application's logging setup should raise that logger to WARNING.
"""
from __future__ import annotations

import email.utils
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import urljoin, urlsplit

import httpx

from dicom_fusion.fhir.errors import AuthenticationError, FHIRError, FHIRUnavailable, error_for_status

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
AuthMode = Literal["none", "bearer", "client_credentials"]
SearchParams = Mapping[str, str | Sequence[str]] | Sequence[tuple[str, str]]
EventHook = Callable[[Any], None]

#: Transport failures worth another attempt (the server may be restarting or briefly overloaded).
#: Others — unsupported URL scheme, local protocol errors — are configuration errors and fail at once.
_RETRYABLE_EXC = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, httpx.ProxyError)
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class FhirAuth:
    """How the client authenticates: no auth, a static bearer token, or OAuth2 client credentials.

    Secrets are excluded from `repr` so that logging a settings object cannot leak them.
    """

    mode: AuthMode = "none"
    token: str | None = field(default=None, repr=False)
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    scope: str | None = None

    def __post_init__(self) -> None:
        if self.mode == "none":
            return
        if self.mode == "bearer":
            if not self.token:
                raise ValueError("fhir.auth.mode is 'bearer' but no token was given; set fhir.auth.token")
            return
        if self.mode == "client_credentials":
            missing = [n for n in ("token_url", "client_id", "client_secret") if not getattr(self, n)]
            if missing:
                raise ValueError(f"fhir.auth.mode is 'client_credentials' but {', '.join(missing)} "
                                 f"{'is' if len(missing) == 1 else 'are'} missing; set fhir.auth."
                                 f"{' / fhir.auth.'.join(missing)}")
            if not str(self.token_url).startswith(("http://", "https://")):
                raise ValueError("fhir.auth.token_url must be an http(s) URL")
            return
        raise ValueError(f"Unknown fhir.auth.mode {self.mode!r}; "
                         "use 'none', 'bearer' or 'client_credentials'")


class _TokenCache:
    """Caches an OAuth2 access token and refreshes it shortly before it expires.

    Refreshing `margin` seconds early (60 s, or half the lifetime for very short-lived tokens) avoids
    sending a token that expires in flight. A lock keeps threads sharing one client from fetching twice.
    """

    def __init__(self, fetch: Callable[[], tuple[str, float]], *, margin: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def get(self) -> str:
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, lifetime = self._fetch()
                self._token = token
                self._refresh_at = self._clock() + lifetime - min(self._margin, lifetime / 2)
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None


class FhirClient:
    """Synchronous FHIR R4 client for one server (`base_url` is the FHIR base, e.g. https://host/fhir).

    Every request is retried `retries` times on connection errors, timeouts, 429 and 5xx, sleeping
    `backoff * 2**attempt` seconds or the server's Retry-After (capped at `max_retry_after`). Retrying POST
    is safe for this package because its transactions are conditional creates. `transport`, `event_hooks`
    and `sleep` exist for tests and instrumentation.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0, auth: FhirAuth | None = None,
                 retries: int = 3, backoff: float = 0.5, verify: bool | str = True, page_size: int = 200,
                 max_retry_after: float = 30.0, transport: httpx.BaseTransport | None = None,
                 event_hooks: Mapping[str, list[EventHook]] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"fhir.base_url must start with http:// or https:// (got {base_url!r})")
        if retries < 0 or backoff < 0 or timeout <= 0 or page_size < 1:
            raise ValueError("FhirClient needs retries >= 0, backoff >= 0, timeout > 0 and page_size >= 1")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.page_size = page_size
        self.max_retry_after = max_retry_after
        self.auth = auth or FhirAuth()
        self._sleep = sleep
        self._http = httpx.Client(timeout=timeout, verify=verify, transport=transport,
                                  event_hooks={k: list(v) for k, v in (event_hooks or {}).items()},
                                  headers={"Accept": FHIR_JSON}, follow_redirects=False)
        self._tokens = _TokenCache(self._fetch_token) if self.auth.mode == "client_credentials" else None

    # ---- public interactions -----------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The server's CapabilityStatement; a cheap reachability and configuration check."""
        return self._request_json("GET", f"{self.base_url}/metadata", what="GET metadata")

    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        """GET [base]/[type]/[id]; raises `ResourceNotFound` when it does not exist."""
        _check_type(resource_type)
        if not _ID_RE.match(resource_id):
            raise ValueError(f"{resource_id!r} is not a valid FHIR resource id")
        return self._request_json("GET", f"{self.base_url}/{resource_type}/{resource_id}",
                                  what=f"GET {resource_type} read")

    def search(self, resource_type: str, params: SearchParams | None = None) -> Iterator[dict[str, Any]]:
        """Yield every matching resource, following Bundle.link[relation=next] page after page.

        `_count` defaults to `page_size`. Included resources and OperationOutcome entries are not yielded
        (the latter are logged by issue code: a server that ignores a parameter says so there).
        Requests are made lazily, as the iterator is consumed.
        """
        _check_type(resource_type)  # eagerly: a bad argument fails here, not at the first next()
        query = _normalise_params(params)
        if not any(k == "_count" for k, _ in query):
            query.append(("_count", str(self.page_size)))
        return self._pages(resource_type, query)

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle to the base URL and return the transaction-response Bundle."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise ValueError("transaction() needs a Bundle with type 'transaction'")
        n = len(bundle.get("entry") or [])
        body = json.dumps(bundle, separators=(",", ":")).encode()
        result = self._request_json("POST", self.base_url, what=f"POST transaction ({n} entries)",
                                    content=body, headers={"Content-Type": FHIR_JSON})
        if result.get("resourceType") != "Bundle":
            raise FHIRError(f"FHIR server {self.base_url} answered a transaction with a "
                            f"{result.get('resourceType')!r} instead of a transaction-response Bundle")
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FhirClient({self.base_url!r}, auth={self.auth.mode!r}, retries={self.retries})"

    # ---- request machinery -------------------------------------------------------------------------------

    def _pages(self, resource_type: str, query: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        """The generator behind `search`: one request per page, next links checked and de-looped."""
        what = f"GET {resource_type} search"
        url: str = f"{self.base_url}/{resource_type}"
        request_params: list[tuple[str, str]] | None = query
        seen: set[str] = set()
        pages = total = 0
        while True:
            bundle = self._request_json("GET", url, what=what, params=request_params)
            if bundle.get("resourceType") != "Bundle":
                raise FHIRError(f"FHIR server {self.base_url} answered {what} with a "
                                f"{bundle.get('resourceType')!r} instead of a Bundle; check fhir.base_url")
            pages += 1
            entries = bundle.get("entry") or []
            for entry in entries:
                resource = entry.get("resource")
                mode = (entry.get("search") or {}).get("mode", "match")
                if not isinstance(resource, dict):
                    continue
                if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
                    _log_outcome(what, resource)
                    continue
                if mode == "match":
                    total += 1
                    yield resource
            next_url = _next_link(bundle)
            if not next_url:
                break
            if not entries:
                log.warning("%s: page %d is empty but links to a next page; stopping", what, pages)
                break
            url = self._same_server(next_url, what)
            if url in seen:
                raise FHIRError(f"FHIR server {self.base_url} returned the same next link twice for {what}; "
                                "its paging is broken — report it to the server's operator")
            seen.add(url)
            request_params = None
        log.debug("%s: %d resources in %d page(s)", what, total, pages)

    def _request_json(self, method: str, url: str, *, what: str,
                      params: list[tuple[str, str]] | None = None, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        resp, attempts = self._send(method, url, what=what, params=params, content=content, headers=headers)
        log.debug("%s -> %d in %.0f ms", what, resp.status_code, (time.perf_counter() - started) * 1000)
        if not resp.is_success:
            outcome = _maybe_json(resp)
            raise error_for_status(resp.status_code, what, self.base_url,
                                   outcome if isinstance(outcome, dict) else None, resp.text[:300], attempts)
        body = _maybe_json(resp)
        if not isinstance(body, dict):
            ctype = resp.headers.get("content-type", "?")
            raise FHIRError(f"FHIR server {self.base_url} answered {what} with non-JSON content ({ctype}); "
                            "check fhir.base_url points at the FHIR base (e.g. https://host/fhir)",
                            status=resp.status_code)
        return body

    def _send(self, method: str, url: str, *, what: str, params: list[tuple[str, str]] | None = None,
              content: bytes | None = None, data: Mapping[str, str] | None = None,
              headers: Mapping[str, str] | None = None, basic: tuple[str, str] | None = None,
              authenticated: bool = True) -> tuple[httpx.Response, int]:
        """Send with retries; returns the last response and how many attempts it took."""
        attempt = 0
        reauthenticated = False
        while True:
            req_headers = dict(headers or {})
            if authenticated:
                req_headers.update(self._auth_headers())
            try:
                resp = self._http.request(method, url, params=tuple(params) if params else None,
                                          content=content, data=data, headers=req_headers,
                                          auth=basic if basic else httpx.USE_CLIENT_DEFAULT)
            except _RETRYABLE_EXC as exc:
                if attempt >= self.retries:
                    raise FHIRUnavailable(
                        f"FHIR server {self.base_url} unreachable for {what} after {attempt + 1} attempt(s) "
                        f"({type(exc).__name__}: {exc}). Check fhir.base_url, that the server is running and "
                        "reachable from this host (proxy, firewall), and fhir.verify for TLS problems."
                    ) from exc
                delay = self._delay(attempt, None)
                log.warning("%s failed (%s), attempt %d/%d; retrying in %.2f s", what, type(exc).__name__,
                            attempt + 1, self.retries + 1, delay)
            except httpx.HTTPError as exc:
                raise FHIRError(f"Cannot send {what} to {self.base_url} ({type(exc).__name__}: {exc}); "
                                "check fhir.base_url") from exc
            else:
                status = resp.status_code
                if status == 401 and authenticated and self._tokens is not None and not reauthenticated:
                    # the cached token may have been revoked or the server restarted: fetch a new one once
                    log.info("%s -> 401; refreshing the access token once", what)
                    self._tokens.invalidate()
                    reauthenticated = True
                    continue
                if (status == 429 or status >= 500) and attempt < self.retries:
                    delay = self._delay(attempt, resp.headers.get("Retry-After"))
                    log.warning("%s -> HTTP %d, attempt %d/%d; retrying in %.2f s", what, status, attempt + 1,
                                self.retries + 1, delay)
                    resp.close()
                else:
                    return resp, attempt + 1
            self._sleep(delay)
            attempt += 1

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds to wait before the next attempt: Retry-After when given, else exponential backoff."""
        server = _parse_retry_after(retry_after)
        delay = server if server is not None else self.backoff * (2 ** attempt)
        return max(0.0, min(delay, self.max_retry_after))

    def _auth_headers(self) -> dict[str, str]:
        if self.auth.mode == "bearer":
            return {"Authorization": f"Bearer {self.auth.token}"}
        if self._tokens is not None:
            return {"Authorization": f"Bearer {self._tokens.get()}"}
        return {}

    def _fetch_token(self) -> tuple[str, float]:
        """OAuth2 client-credentials grant (RFC 6749 4.4), client authenticated with HTTP Basic."""
        auth = self.auth
        assert auth.token_url and auth.client_id and auth.client_secret  # checked by FhirAuth
        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        resp, attempts = self._send("POST", auth.token_url, what="POST token request", data=form,
                                    headers={"Accept": "application/json"},
                                    basic=(auth.client_id, auth.client_secret), authenticated=False)
        body = _maybe_json(resp)
        body = body if isinstance(body, dict) else {}
        if not resp.is_success:
            reason = " ".join(str(body[k]) for k in ("error", "error_description") if body.get(k))
            detail = f"HTTP {resp.status_code}{': ' + reason if reason else ''}"
            if resp.status_code in (400, 401, 403):
                raise AuthenticationError(f"Token endpoint {auth.token_url} refused the client credentials "
                                          f"({detail}); check fhir.auth.client_id, fhir.auth.client_secret "
                                          "and fhir.auth.scope", status=resp.status_code)
            if resp.status_code == 429 or resp.status_code >= 500:
                raise FHIRUnavailable(f"Token endpoint {auth.token_url} failed ({detail}) after {attempts} "
                                      "attempt(s); the job is retried later", status=resp.status_code)
            raise FHIRError(f"Token endpoint {auth.token_url} answered {detail}; check fhir.auth.token_url",
                            status=resp.status_code)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthenticationError(f"Token endpoint {auth.token_url} answered without an access_token; "
                                      "check fhir.auth.token_url points at the OAuth2 token endpoint")
        try:
            lifetime = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        log.info("obtained an access token (expires in %.0f s)", lifetime)
        return token, max(lifetime, 0.0)

    def _same_server(self, link: str, what: str) -> str:
        """Resolve a paging link and refuse to follow it to another server (it would get our credentials)."""
        absolute = urljoin(self.base_url + "/", link)
        ours, theirs = urlsplit(self.base_url), urlsplit(absolute)
        if (ours.scheme, ours.netloc) != (theirs.scheme, theirs.netloc):
            raise FHIRError(f"FHIR server {self.base_url} returned a paging link for {what} on another host "
                            f"({theirs.scheme}://{theirs.netloc}); configure the server's public base URL to "
                            "match fhir.base_url (reverse proxies often cause this)")
        return absolute


# ---- helpers ---------------------------------------------------------------------------------------------


def _check_type(resource_type: str) -> None:
    if not _TYPE_RE.match(resource_type):
        raise ValueError(f"{resource_type!r} is not a FHIR resource type name (e.g. 'Observation')")


def _normalise_params(params: SearchParams | None) -> list[tuple[str, str]]:
    """Accept a mapping (values may be lists, for repeated parameters) or a sequence of pairs."""
    if params is None:
        return []
    out: list[tuple[str, str]] = []
    items = params.items() if isinstance(params, Mapping) else params
    for key, value in items:
        if isinstance(value, (list, tuple)):
            out.extend((key, str(v)) for v in value)
        else:
            out.append((key, str(value)))
    return out


def _next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def _maybe_json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


def _log_outcome(what: str, outcome: dict[str, Any]) -> None:
    # issue codes only: diagnostics may echo search values, which can be patient identifiers
    codes = [f"{i.get('severity', '?')}/{i.get('code', '?')}" for i in outcome.get("issue") or []
             if isinstance(i, dict)]
    if codes:
        log.warning("%s: server reported %d issue(s): %s", what, len(codes), ", ".join(codes))
