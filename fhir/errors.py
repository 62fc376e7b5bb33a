"""Error hierarchy of `dicom_fusion.fhir`, and the one place where an HTTP answer becomes an exception.

The service maps these to job states: `FHIRUnavailable` is worth retrying later (or degrading to an
image-only result; `FHIRRetryLater` says how long the server asked us to wait), `FetchLimitExceeded`
means the fetch passed its deadline or a cap (degrade, do not retry), everything else needs a person to
fix configuration or data.

No patient data in messages. A server's error page or OperationOutcome `diagnostics` often echo the
request — patient identifiers, names — and messages end up in logs, the ledger's audit rows, the SR and
the report. So a message built from a remote answer carries the HTTP status and the OperationOutcome's
issue severity/code (a fixed vocabulary, checked against a pattern) and never the body or the diagnostics
text. Callers pass a description of the request ("GET Patient search"), not its URL, because search
URLs hold identifiers, and the server's URL without userinfo (`client.redact_url`). The OperationOutcome
itself stays on the exception (`outcome`) for code that needs it: it may hold patient data, never log it.
"""
from __future__ import annotations

import re
from typing import Any

#: What an issue severity or code may look like (FHIR's IssueSeverity / IssueType codes are lower-case
#: words joined by hyphens). Anything else a server sends there is shown as "?", never echoed.
_CODE_RE = re.compile(r"^[a-z][a-z-]{0,39}$")


class FHIRError(Exception):
    """Base class of every error raised by `dicom_fusion.fhir`.

    `status` is the HTTP status when the server answered (None for transport failures), `outcome` the
    OperationOutcome it sent, if any (may hold patient data: never put it in a message or a log).
    """

    retryable: bool = False

    def __init__(self, message: str, *, status: int | None = None, outcome: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.outcome = outcome


class FHIRUnavailable(FHIRError):
    """The server could not be reached, or kept answering 5xx / 429 after all retries."""

    retryable = True


class FHIRRetryLater(FHIRUnavailable):
    """The server asked us to come back later (429 / 5xx with Retry-After) for longer than the client
    sleeps inside a call; `retry_after` is the wait it asked for, in seconds. The caller re-schedules
    (the worker's countdown) instead of holding the worker."""

    def __init__(self, message: str, *, retry_after: float, status: int | None = None,
                 outcome: dict[str, Any] | None = None):
        super().__init__(message, status=status, outcome=outcome)
        self.retry_after = max(0.0, float(retry_after))


class FetchLimitExceeded(FHIRError):
    """A fetch passed its deadline or one of its caps (pages, resources, bytes), see `client.FetchLimits`.

    `limit` names it ("deadline", "pages", "resources", "bytes"), `value` is the limit that was passed.
    Not retryable: the same patient would pass it again; the caller degrades (image-only prediction).
    """

    def __init__(self, message: str, *, limit: str, value: float):
        super().__init__(message)
        self.limit = limit
        self.value = value


class AuthenticationError(FHIRError):
    """401 / 403 from the FHIR server, or the token endpoint refused our client credentials."""


class ResourceNotFound(FHIRError):
    """404 / 410: the resource (or the resource type / endpoint) does not exist on this server."""


class OperationOutcomeError(FHIRError):
    """Any other 4xx: the server understood the request and rejected it; its issue codes say why."""


def safe_code(value: Any) -> str:
    """`value` if it looks like a FHIR code (lower-case words and hyphens), else "?": what a remote
    server put in a coded element is shown only when it cannot be free text."""
    return value if isinstance(value, str) and _CODE_RE.match(value) else "?"


def outcome_codes(outcome: dict[str, Any] | None) -> str:
    """The issues of an OperationOutcome as `severity/code` pairs ("error/processing, warning/not-found").

    Never the `diagnostics` or `details.text`: servers echo search values there, which can be patient
    identifiers and names.
    """
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    issues = [i for i in outcome.get("issue") or [] if isinstance(i, dict)]
    return ", ".join(f"{safe_code(i.get('severity'))}/{safe_code(i.get('code'))}" for i in issues[:10])


_ADVICE = {
    401: "check fhir.auth (mode, token or client credentials) and that the token is accepted by this server",
    403: "the credentials are valid but lack permission: check the granted scopes (fhir.auth.scope) or the "
         "server's access policy for this client",
    404: "check fhir.base_url (it must end at the FHIR base, e.g. https://host/fhir) and the resource id",
    410: "the resource was deleted on the server",
    429: "the server is rate limiting this client: lower the worker concurrency or raise fhir.retries",
}


def error_for_status(status: int, what: str, server: str, outcome: dict[str, Any] | None,
                     attempts: int = 1, retry_after: float | None = None) -> FHIRError:
    """Map an unsuccessful HTTP answer to the exception callers handle.

    `what` describes the request without patient data (e.g. "GET Observation search"); `server` is the
    base URL as it may be shown (without userinfo); `attempts` > 1 says retries were exhausted;
    `retry_after` (seconds, from the Retry-After header) makes a 429 / 5xx a `FHIRRetryLater`. The message
    holds the status and the OperationOutcome's issue codes only — never the body or its diagnostics.
    """
    codes = outcome_codes(outcome)
    detail = f" (OperationOutcome {codes})" if codes else ""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    head = f"FHIR server {server} answered HTTP {status} to {what}{tries}{detail}"
    if status in (401, 403):
        return AuthenticationError(f"{head}. {_ADVICE[status]}.", status=status, outcome=outcome)
    if status in (404, 410):
        return ResourceNotFound(f"{head}. {_ADVICE[status]}.", status=status, outcome=outcome)
    if (status == 429 or status >= 500) and retry_after is not None:
        return FHIRRetryLater(f"{head}; it asked to retry in {retry_after:.0f} s. "
                              f"{_ADVICE[429] + '.' if status == 429 else 'The server is unavailable.'}",
                              retry_after=retry_after, status=status, outcome=outcome)
    if status == 429:
        return FHIRUnavailable(f"{head}. {_ADVICE[429]}.", status=status, outcome=outcome)
    if status >= 500:
        return FHIRUnavailable(f"{head}. The server failed; check its logs, the job is retried later.",
                               status=status, outcome=outcome)
    if 400 <= status < 500:
        return OperationOutcomeError(f"{head}. The request was rejected; the server's log says why for "
                                     "this request (its diagnostics are not copied here: they can echo "
                                     "patient data).", status=status, outcome=outcome)
    return FHIRError(f"{head}. Unexpected status for a FHIR REST call; check fhir.base_url points at a FHIR "
                     "server and not at a login page or proxy.", status=status, outcome=outcome)
