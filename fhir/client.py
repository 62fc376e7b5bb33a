"""A small synchronous FHIR R4 REST client (httpx): read, search with paging, transaction.

Why our own and not a generic FHIR library: the service needs exactly four interactions, and it needs them
to behave predictably in a worker — bounded retries with backoff that honour the server's Retry-After,
one exception hierarchy (`errors.py`) the task layer maps to job states, OAuth2 client-credentials with a
cached token, and logs that never contain patient data or credentials.

Bounded calls: every call runs under a `FetchBudget` — a deadline over all its requests, pages and retries
(a server trickling one byte a second or a paging cursor that never ends cannot hold a worker), and
optional caps on pages, resources and bytes (`FetchLimits`; the timeline stage passes one budget for the
whole patient fetch, other calls get `call_deadline`). Bodies are streamed and the deadline and the byte
cap are checked between chunks; a watchdog interrupts a request that is still waiting for its first bytes
at the deadline. A Retry-After longer than `max_retry_after` is never slept: `FHIRRetryLater` carries the
wait to the caller, which re-schedules.

Logging: this module logs resource types, counts, statuses and timings only. Search URLs carry patient
identifiers, so they are never logged here; note that httpx itself logs every request URL at INFO on the
"httpx" logger — the application's logging setup should raise that logger to WARNING.
"""
from __future__ import annotations

import email.utils
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import SplitResult, urljoin, urlsplit, urlunsplit

import httpx

from dicom_fusion.fhir.errors import (
    AuthenticationError,
    FetchLimitExceeded,
    FHIRError,
    FHIRRetryLater,
    FHIRUnavailable,
    error_for_status,
    outcome_codes,
)

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
_MEDIA_TYPE_RE = re.compile(r"^[\w.+-]{1,64}/[\w.+-]{1,64}$")
_OAUTH_ERROR_RE = re.compile(r"^[a-z_]{1,40}$")


def redact_url(url: str) -> str:
    """`url` as it may be shown (messages, logs, readiness, config output): userinfo replaced by `***`.

    `https://user:secret@ehr.example/fhir` -> `https://***@ehr.example/fhir`; URLs without userinfo (and
    strings that are not URLs) are returned unchanged.
    """
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@dataclass(frozen=True)
class FetchLimits:
    """Bounds of one fetch: a deadline over all its requests (retries, pages and waits included) and
    optional caps on pages, resources and bytes (None = no cap).

    A cursor that never ends is caught by `max_pages`, a trickle or a hang by `deadline_seconds`, a huge or
    endless body by `max_bytes` (counted decoded, so a compressed bomb counts at its real size).
    """

    deadline_seconds: float = 60.0
    max_pages: int | None = None
    max_resources: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not (self.deadline_seconds > 0 and math.isfinite(self.deadline_seconds)):
            raise ValueError(f"FetchLimits.deadline_seconds must be a positive number of seconds, "
                             f"got {self.deadline_seconds!r}")
        for name in ("max_pages", "max_resources", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"FetchLimits.{name} must be >= 1 or None (no cap), got {value!r}")


class FetchBudget:
    """What one fetch has used of its `FetchLimits`: time since it started, pages, resources, bytes.

    Share one budget across the calls that make up one fetch (the patient lookup and every search of a
    timeline); each `add_*` raises `FetchLimitExceeded` when its cap is passed.
    """

    def __init__(self, limits: FetchLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.started = clock()
        self.deadline = self.started + limits.deadline_seconds
        self.pages = 0
        self.resources = 0
        self.bytes = 0

    def elapsed(self) -> float:
        return self._clock() - self.started

    def remaining(self) -> float:
        return self.deadline - self._clock()

    def check_deadline(self, what: str) -> None:
        if self.remaining() <= 0:
            raise FetchLimitExceeded(
                f"{what} passed the fetch's deadline of {self.limits.deadline_seconds:g} s "
                f"({self.pages} page(s), {self.resources} resource(s), {self.bytes} bytes read)",
                limit="deadline", value=self.limits.deadline_seconds)

    def add_page(self, what: str) -> None:
        self.pages += 1
        self._cap("pages", self.pages, self.limits.max_pages, what)

    def add_resources(self, n: int, what: str) -> None:
        self.resources += n
        self._cap("resources", self.resources, self.limits.max_resources, what)

    def add_bytes(self, n: int, what: str) -> None:
        self.bytes += n
        self._cap("bytes", self.bytes, self.limits.max_bytes, what)

    def _cap(self, limit: str, used: int, cap: int | None, what: str) -> None:
        if cap is not None and used > cap:
            raise FetchLimitExceeded(f"{what} passed the fetch's cap of {cap} {limit} after "
                                     f"{self.elapsed():.1f} s", limit=limit, value=cap)


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

    def __init__(self, fetch: Callable[..., tuple[str, float]], *, margin: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._margin = margin
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0

    def get(self, *args: Any) -> str:
        """The cached token, fetched (`fetch(*args)`) when missing or about to expire."""
        with self._lock:
            if self._token is None or self._clock() >= self._refresh_at:
                token, lifetime = self._fetch(*args)
                self._token = token
                self._refresh_at = self._clock() + lifetime - min(self._margin, lifetime / 2)
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None


class FhirClient:
    """Synchronous FHIR R4 client for one server (`base_url` is the FHIR base, e.g. https://host/fhir).

    Every request is retried `retries` times on connection errors, timeouts, 429 and 5xx, sleeping
    `backoff * 2**attempt` seconds (at most `max_retry_after`) or the server's Retry-After. A Retry-After
    longer than `max_retry_after`, or one that does not fit in the call's deadline, is not slept: the call
    raises `FHIRRetryLater` carrying the wait. Each call runs under a `FetchBudget` (`budget=`, or a fresh
    one of `call_deadline` seconds): past its deadline or a cap the call raises `FetchLimitExceeded`.
    Retrying POST is safe for this package because its transactions are conditional creates.
    `transport`, `event_hooks` and `sleep` exist for tests and instrumentation.
    """

    def __init__(self, base_url: str, *, timeout: float = 10.0, auth: FhirAuth | None = None,
                 retries: int = 3, backoff: float = 0.5, verify: bool | str = True, page_size: int = 200,
                 max_retry_after: float = 10.0, call_deadline: float = 120.0,
                 transport: httpx.BaseTransport | None = None,
                 event_hooks: Mapping[str, list[EventHook]] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("fhir.base_url must start with http:// or https:// "
                             f"(got {redact_url(base_url)!r})")
        if retries < 0 or backoff < 0 or timeout <= 0 or page_size < 1 or call_deadline <= 0:
            raise ValueError("FhirClient needs retries >= 0, backoff >= 0, timeout > 0, page_size >= 1 and "
                             "call_deadline > 0")
        self.base_url = base_url.rstrip("/")
        self.server = redact_url(self.base_url)  # the base URL as messages and logs may show it
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.page_size = page_size
        self.max_retry_after = max_retry_after
        self.call_deadline = call_deadline
        self.auth = auth or FhirAuth()
        self._sleep = sleep
        self._http_options: dict[str, Any] = {
            "timeout": timeout, "verify": verify, "transport": transport, "headers": {"Accept": FHIR_JSON},
            "event_hooks": {k: list(v) for k, v in (event_hooks or {}).items()}, "follow_redirects": False}
        self._http = httpx.Client(**self._http_options)
        self._http_lock = threading.Lock()
        self._interrupted = False
        self._tokens = _TokenCache(self._fetch_token) if self.auth.mode == "client_credentials" else None

    # ---- public interactions -----------------------------------------------------------------------------

    def metadata(self, *, budget: FetchBudget | None = None) -> dict[str, Any]:
        """The server's CapabilityStatement; a cheap reachability and configuration check."""
        return self._request_json("GET", f"{self.base_url}/metadata", what="GET metadata",
                                  budget=budget or self.new_budget())

    def read(self, resource_type: str, resource_id: str, *,
             budget: FetchBudget | None = None) -> dict[str, Any]:
        """GET [base]/[type]/[id]; raises `ResourceNotFound` when it does not exist."""
        _check_type(resource_type)
        if not _ID_RE.match(resource_id):
            raise ValueError(f"{resource_id!r} is not a valid FHIR resource id")
        return self._request_json("GET", f"{self.base_url}/{resource_type}/{resource_id}",
                                  what=f"GET {resource_type} read", budget=budget or self.new_budget())

    def search(self, resource_type: str, params: SearchParams | None = None, *,
               budget: FetchBudget | None = None) -> Iterator[dict[str, Any]]:
        """Yield every matching resource, following Bundle.link[relation=next] page after page.

        `_count` defaults to `page_size`. Included resources and OperationOutcome entries are not yielded
        (the latter are logged by issue code: a server that ignores a parameter says so there).
        Requests are made lazily, as the iterator is consumed. Every page, resource and byte counts against
        `budget` (default: a fresh one of `call_deadline` seconds for this search).
        """
        _check_type(resource_type)  # eagerly: a bad argument fails here, not at the first next()
        query = _normalise_params(params)
        if not any(k == "_count" for k, _ in query):
            query.append(("_count", str(self.page_size)))
        return self._pages(resource_type, query, budget)

    def transaction(self, bundle: dict[str, Any], *, budget: FetchBudget | None = None) -> dict[str, Any]:
        """POST a transaction Bundle to the base URL and return the transaction-response Bundle."""
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            raise ValueError("transaction() needs a Bundle with type 'transaction'")
        n = len(bundle.get("entry") or [])
        body = json.dumps(bundle, separators=(",", ":")).encode()
        result = self._request_json("POST", self.base_url, what=f"POST transaction ({n} entries)",
                                    budget=budget or self.new_budget(), content=body,
                                    headers={"Content-Type": FHIR_JSON})
        if result.get("resourceType") != "Bundle":
            raise FHIRError(f"FHIR server {self.server} answered a transaction with a "
                            f"{_shown_type(result)} instead of a transaction-response Bundle")
        return result

    def new_budget(self, limits: FetchLimits | None = None) -> FetchBudget:
        """A budget for one fetch: `limits`, or just this client's `call_deadline`."""
        return FetchBudget(limits or FetchLimits(deadline_seconds=self.call_deadline))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FhirClient({self.server!r}, auth={self.auth.mode!r}, retries={self.retries})"

    # ---- request machinery -------------------------------------------------------------------------------

    def _pages(self, resource_type: str, query: list[tuple[str, str]],
               budget: FetchBudget | None) -> Iterator[dict[str, Any]]:
        """The generator behind `search`: one request per page, next links checked and de-looped; pages,
        resources and bytes counted against the budget (a cursor that never ends meets `max_pages`)."""
        what = f"GET {resource_type} search"
        budget = budget or self.new_budget()
        url: str = f"{self.base_url}/{resource_type}"
        request_params: list[tuple[str, str]] | None = query
        seen: set[str] = set()
        pages = total = 0
        while True:
            budget.add_page(what)
            bundle = self._request_json("GET", url, what=what, budget=budget, params=request_params)
            if bundle.get("resourceType") != "Bundle":
                raise FHIRError(f"FHIR server {self.server} answered {what} with a "
                                f"{_shown_type(bundle)} instead of a Bundle; check fhir.base_url")
            pages += 1
            entries = bundle.get("entry") or []
            if not isinstance(entries, list):
                entries = []
            for entry in entries:
                if not isinstance(entry, dict):
                    continue
                resource = entry.get("resource")
                search = entry.get("search")
                mode = search.get("mode", "match") if isinstance(search, dict) else "match"
                if not isinstance(resource, dict):
                    continue
                if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
                    _log_outcome(what, resource)
                    continue
                if mode == "match":
                    total += 1
                    budget.add_resources(1, what)
                    yield resource
            next_url = _next_link(bundle)
            if not next_url:
                break
            if not entries:
                log.warning("%s: page %d is empty but links to a next page; stopping", what, pages)
                break
            url = self._same_server(next_url, what)
            if url in seen:
                raise FHIRError(f"FHIR server {self.server} returned the same next link twice for {what}; "
                                "its paging is broken — report it to the server's operator")
            seen.add(url)
            request_params = None
        log.debug("%s: %d resources in %d page(s)", what, total, pages)

    def _request_json(self, method: str, url: str, *, what: str, budget: FetchBudget,
                      params: list[tuple[str, str]] | None = None, content: bytes | None = None,
                      headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        started = time.perf_counter()
        resp, body, attempts = self._send(method, url, what=what, budget=budget, params=params,
                                          content=content, headers=headers)
        log.debug("%s -> %d in %.0f ms", what, resp.status_code, (time.perf_counter() - started) * 1000)
        parsed = _parse_json(body)
        if not resp.is_success:
            raise error_for_status(resp.status_code, what, self.server,
                                   parsed if isinstance(parsed, dict) else None, attempts,
                                   retry_after=_parse_retry_after(resp.headers.get("Retry-After")))
        if not isinstance(parsed, dict):
            ctype = resp.headers.get("content-type", "").split(";")[0].strip()
            ctype = ctype if _MEDIA_TYPE_RE.match(ctype) else "?"
            raise FHIRError(f"FHIR server {self.server} answered {what} with non-JSON content ({ctype}); "
                            "check fhir.base_url points at the FHIR base (e.g. https://host/fhir)",
                            status=resp.status_code)
        return parsed

    def _send(self, method: str, url: str, *, what: str, budget: FetchBudget,
              params: list[tuple[str, str]] | None = None, content: bytes | None = None,
              data: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
              basic: tuple[str, str] | None = None,
              authenticated: bool = True) -> tuple[httpx.Response, bytes, int]:
        """Send with retries; returns the last response (closed), its body and how many attempts it took."""
        attempt = 0
        reauthenticated = False
        while True:
            budget.check_deadline(what)
            req_headers = dict(headers or {})
            if authenticated:
                req_headers.update(self._auth_headers(budget))
            server_wait: float | None = None
            try:
                resp, body = self._exchange(method, url, what=what, budget=budget, params=params,
                                            content=content, data=data, headers=req_headers, basic=basic)
            except _RETRYABLE_EXC as exc:
                if attempt >= self.retries:
                    raise FHIRUnavailable(
                        f"FHIR server {self.server} unreachable for {what} after {attempt + 1} attempt(s) "
                        f"({_describe(exc)}). Check fhir.base_url, that the server is running and "
                        "reachable from this host (proxy, firewall), and fhir.verify for TLS problems."
                    ) from exc
                delay = self._delay(attempt, None)
                log.warning("%s failed (%s), attempt %d/%d; retrying in %.2f s", what, type(exc).__name__,
                            attempt + 1, self.retries + 1, delay)
            except httpx.HTTPError as exc:
                raise FHIRError(f"Cannot send {what} to {self.server} ({_describe(exc)}); "
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
                    server_wait = _parse_retry_after(resp.headers.get("Retry-After"))
                    if server_wait is not None and server_wait > self.max_retry_after:
                        # the server asked for more quiet than we sleep inside a call: the caller re-schedules
                        parsed = _parse_json(body)
                        raise error_for_status(status, what, self.server,
                                               parsed if isinstance(parsed, dict) else None, attempt + 1,
                                               retry_after=server_wait)
                    delay = self._delay(attempt, server_wait)
                    log.warning("%s -> HTTP %d, attempt %d/%d; retrying in %.2f s", what, status, attempt + 1,
                                self.retries + 1, delay)
                else:
                    return resp, body, attempt + 1
            if delay >= budget.remaining():
                if server_wait is not None:
                    raise FHIRRetryLater(f"FHIR server {self.server} asked to retry {what} in "
                                         f"{server_wait:.0f} s, past this fetch's deadline",
                                         retry_after=server_wait, status=resp.status_code)
                budget.check_deadline(what)
                raise FetchLimitExceeded(
                    f"{what} failed and its next attempt in {delay:.1f} s would pass the fetch's deadline of "
                    f"{budget.limits.deadline_seconds:g} s", limit="deadline",
                    value=budget.limits.deadline_seconds)
            self._sleep(delay)
            attempt += 1

    def _exchange(self, method: str, url: str, *, what: str, budget: FetchBudget,
                  params: list[tuple[str, str]] | None, content: bytes | None, data: Mapping[str, str] | None,
                  headers: Mapping[str, str], basic: tuple[str, str] | None) -> tuple[httpx.Response, bytes]:
        """One request under the budget: timeouts no longer than what is left, the body streamed with the
        deadline and the byte cap checked between chunks, and a watchdog that interrupts the request at the
        deadline (a server trickling its status line and headers never yields a chunk to check between)."""
        with self._http_lock:
            if self._interrupted:  # a watchdog closed the connection pool: start a new one
                self._http = httpx.Client(**self._http_options)
                self._interrupted = False
            http = self._http
        left = budget.remaining()
        request = http.build_request(method, url, params=tuple(params) if params else None, content=content,
                                     data=data, headers=headers, timeout=min(self.timeout, max(left, 0.001)))
        watchdog = threading.Timer(max(left, 0.0), self._interrupt, args=(http,))
        watchdog.daemon = True
        watchdog.start()
        try:
            resp = http.send(request, stream=True, auth=basic if basic else httpx.USE_CLIENT_DEFAULT)
            try:
                declared = resp.headers.get("Content-Length", "")
                if declared.isdigit() and budget.limits.max_bytes is not None \
                        and budget.bytes + int(declared) > budget.limits.max_bytes:
                    budget.add_bytes(int(declared), what)  # raises: do not start reading what cannot fit
                chunks: list[bytes] = []
                for chunk in resp.iter_bytes():
                    budget.add_bytes(len(chunk), what)
                    chunks.append(chunk)
                    budget.check_deadline(what)
            finally:
                resp.close()
        except FetchLimitExceeded:
            raise
        except Exception as exc:
            if watchdog.finished.is_set() and self._interrupted:
                raise FetchLimitExceeded(
                    f"{what} was interrupted at the fetch's deadline of {budget.limits.deadline_seconds:g} s "
                    "(the server had not finished answering)", limit="deadline",
                    value=budget.limits.deadline_seconds) from exc
            raise
        finally:
            watchdog.cancel()
        return resp, b"".join(chunks)

    def _interrupt(self, http: httpx.Client) -> None:
        """The watchdog: close the pool under a request that is past its deadline (its read then fails)."""
        with self._http_lock:
            if http is self._http:
                self._interrupted = True
        http.close()

    def _delay(self, attempt: int, server_wait: float | None) -> float:
        """Seconds to wait before the next attempt: Retry-After when given, else exponential backoff."""
        delay = server_wait if server_wait is not None else self.backoff * (2 ** attempt)
        return max(0.0, min(delay, self.max_retry_after))

    def _auth_headers(self, budget: FetchBudget) -> dict[str, str]:
        if self.auth.mode == "bearer":
            return {"Authorization": f"Bearer {self.auth.token}"}
        if self._tokens is not None:
            return {"Authorization": f"Bearer {self._tokens.get(budget)}"}
        return {}

    def _fetch_token(self, budget: FetchBudget) -> tuple[str, float]:
        """OAuth2 client-credentials grant (RFC 6749 4.4), client authenticated with HTTP Basic."""
        auth = self.auth
        assert auth.token_url and auth.client_id and auth.client_secret  # checked by FhirAuth
        endpoint = redact_url(auth.token_url)
        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        resp, body_bytes, attempts = self._send("POST", auth.token_url, what="POST token request",
                                                budget=budget, data=form,
                                                headers={"Accept": "application/json"},
                                                basic=(auth.client_id, auth.client_secret),
                                                authenticated=False)
        parsed = _parse_json(body_bytes)
        body = parsed if isinstance(parsed, dict) else {}
        if not resp.is_success:
            # the OAuth2 error code only (a fixed vocabulary); error_description is free text
            error = body.get("error")
            reason = error if isinstance(error, str) and _OAUTH_ERROR_RE.match(error) else ""
            detail = f"HTTP {resp.status_code}{': ' + reason if reason else ''}"
            if resp.status_code in (400, 401, 403):
                raise AuthenticationError(f"Token endpoint {endpoint} refused the client credentials "
                                          f"({detail}); check fhir.auth.client_id, fhir.auth.client_secret "
                                          "and fhir.auth.scope", status=resp.status_code)
            if resp.status_code == 429 or resp.status_code >= 500:
                raise FHIRUnavailable(f"Token endpoint {endpoint} failed ({detail}) after {attempts} "
                                      "attempt(s); the job is retried later", status=resp.status_code)
            raise FHIRError(f"Token endpoint {endpoint} answered {detail}; check fhir.auth.token_url",
                            status=resp.status_code)
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise AuthenticationError(f"Token endpoint {endpoint} answered without an access_token; "
                                      "check fhir.auth.token_url points at the OAuth2 token endpoint")
        try:
            lifetime = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        if not math.isfinite(lifetime):
            lifetime = 300.0
        log.info("obtained an access token (expires in %.0f s)", lifetime)
        return token, max(lifetime, 0.0)

    def _same_server(self, link: str, what: str) -> str:
        """Resolve a paging link and refuse to follow it to another server (it would get our credentials)."""
        absolute = urljoin(self.base_url + "/", link)
        ours, theirs = urlsplit(self.base_url), urlsplit(absolute)
        # compared without userinfo: a base URL with credentials gets paging links without them
        if (ours.scheme, _host_port(ours)) != (theirs.scheme, _host_port(theirs)):
            host = theirs.hostname or "?"
            shown = host if re.fullmatch(r"[A-Za-z0-9.\-:\[\]]{1,255}", host) else "?"
            raise FHIRError(f"FHIR server {self.server} returned a paging link for {what} on another host "
                            f"({shown}); configure the server's public base URL to "
                            "match fhir.base_url (reverse proxies often cause this)")
        return absolute


# ---- helpers ---------------------------------------------------------------------------------------------


def _host_port(url: SplitResult) -> tuple[str, int | None]:
    """Host (lower case) and port of a URL, the port defaulted by scheme; userinfo left out."""
    try:
        port = url.port
    except ValueError:
        port = -1
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.hostname or "").lower(), port if port is not None else default


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


def _parse_json(body: bytes) -> Any:
    """The JSON value of a body, or None when it is not JSON (an HTML error page, a truncated answer, or
    nesting deep enough to exhaust the parser)."""
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _describe(exc: Exception) -> str:
    """A transport failure as it may be shown: connection and timeout errors with their (local) text, others
    by type only — a protocol error's text can quote the bytes a server sent."""
    if isinstance(exc, (httpx.ConnectError, httpx.TimeoutException)):
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return type(exc).__name__


def _shown_type(resource: dict[str, Any]) -> str:
    """A resource's type as it may be shown: a FHIR type name, else "an unexpected value"."""
    rtype = resource.get("resourceType")
    return repr(rtype) if isinstance(rtype, str) and _TYPE_RE.match(rtype) else "an unexpected value"


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP-date (RFC 9110 10.2.3); seconds, never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _log_outcome(what: str, outcome: dict[str, Any]) -> None:
    # issue codes only: diagnostics may echo search values, which can be patient identifiers
    codes = outcome_codes(outcome)
    if codes:
        log.warning("%s: server reported issue(s): %s", what, codes)
