"""Error hierarchy of `dicom_fusion.fhir`, and the one place where an HTTP answer becomes an exception.

The service maps these to job states: `FHIRUnavailable` is worth retrying later (or degrading to an
image-only result), everything else needs a person to fix configuration or data. Messages carry the
server's OperationOutcome diagnostics and say what to check, but never patient data: callers pass a
description of the request ("GET Patient search"), not its URL, because search URLs hold identifiers.
"""
from __future__ import annotations

from typing import Any


class FHIRError(Exception):
    """Base class of every error raised by `dicom_fusion.fhir`.

    `status` is the HTTP status when the server answered (None for transport failures), `outcome` the
    OperationOutcome it sent, if any.
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


class AuthenticationError(FHIRError):
    """401 / 403 from the FHIR server, or the token endpoint refused our client credentials."""


class ResourceNotFound(FHIRError):
    """404 / 410: the resource (or the resource type / endpoint) does not exist on this server."""


class OperationOutcomeError(FHIRError):
    """Any other 4xx: the server understood the request and rejected it; its diagnostics say why."""


def outcome_text(outcome: dict[str, Any] | None) -> str:
    """Join the diagnostics (or details.text / code) of an OperationOutcome's issues into one line."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    parts: list[str] = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
        if text:
            parts.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(parts)


_ADVICE = {
    401: "check fhir.auth (mode, token or client credentials) and that the token is accepted by this server",
    403: "the credentials are valid but lack permission: check the granted scopes (fhir.auth.scope) or the "
         "server's access policy for this client",
    404: "check fhir.base_url (it must end at the FHIR base, e.g. https://host/fhir) and the resource id",
    410: "the resource was deleted on the server",
    429: "the server is rate limiting this client: lower the worker concurrency or raise fhir.retries",
}


def error_for_status(status: int, what: str, base_url: str, outcome: dict[str, Any] | None,
                     body_excerpt: str = "", attempts: int = 1) -> FHIRError:
    """Map an unsuccessful HTTP answer to the exception callers handle.

    `what` describes the request without patient data (e.g. "GET Observation search"); `body_excerpt` is
    used only when the server sent no OperationOutcome; `attempts` > 1 says retries were exhausted.
    """
    detail = outcome_text(outcome) or body_excerpt.strip()[:300]
    detail = f": {detail}" if detail else ""
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    head = f"FHIR server {base_url} answered HTTP {status} to {what}{tries}{detail}"
    if status in (401, 403):
        return AuthenticationError(f"{head}. {_ADVICE[status]}.", status=status, outcome=outcome)
    if status in (404, 410):
        return ResourceNotFound(f"{head}. {_ADVICE[status]}.", status=status, outcome=outcome)
    if status == 429:
        return FHIRUnavailable(f"{head}. {_ADVICE[429]}.", status=status, outcome=outcome)
    if status >= 500:
        return FHIRUnavailable(f"{head}. The server failed; check its logs, the job is retried later.",
                               status=status, outcome=outcome)
    if 400 <= status < 500:
        return OperationOutcomeError(f"{head}. The request was rejected; fix the data or the server "
                                     "configuration named in the diagnostics.",
                                     status=status, outcome=outcome)
    return FHIRError(f"{head}. Unexpected status for a FHIR REST call; check fhir.base_url points at a FHIR "
                     "server and not at a login page or proxy.", status=status, outcome=outcome)
