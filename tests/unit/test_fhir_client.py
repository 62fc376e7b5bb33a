"""FhirClient retry, backoff, paging and auth logic against httpx.MockTransport.

Only the HTTP mechanics are mocked here; FHIR semantics (search, transactions) are tested against a real
server in tests/integration/test_fhir_server.py.
"""
from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from urllib.parse import parse_qs

import httpx
import pytest

from dicom_fusion.fhir.client import FhirAuth, FhirClient, _TokenCache
from dicom_fusion.fhir.errors import (
    AuthenticationError,
    FHIRError,
    FHIRUnavailable,
    OperationOutcomeError,
    ResourceNotFound,
)

BASE = "http://fhir.test/fhir"


def outcome(text: str) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing",
                                                           "diagnostics": text}]}


def fhir(status: int, body: dict | None = None, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json=body if body is not None else {}, headers=headers)


class Recorder:
    """A MockTransport handler that answers from a list of responses and keeps the requests."""

    def __init__(self, *responses: httpx.Response | Callable[[httpx.Request], httpx.Response]):
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        item = self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]
        return item(request) if callable(item) else item


def make_client(handler, sleeps: list[float] | None = None, **kw) -> FhirClient:
    record = sleeps if sleeps is not None else []
    return FhirClient(BASE, transport=httpx.MockTransport(handler), sleep=record.append, **kw)


# ---- retries and backoff ---------------------------------------------------------------------------------


def test_5xx_is_retried_with_exponential_backoff_then_succeeds():
    rec = Recorder(fhir(503, outcome("warming up")), fhir(502),
                   fhir(200, {"resourceType": "Patient", "id": "a"}))
    sleeps: list[float] = []
    with make_client(rec, sleeps, backoff=0.5) as client:
        assert client.read("Patient", "a")["id"] == "a"
    assert len(rec.requests) == 3
    assert sleeps == [0.5, 1.0]


@pytest.mark.parametrize("retry_after, expected", [("2", 2.0), ("30", 30.0), ("0", 0.0)])
def test_retry_after_seconds_is_honoured_and_capped(retry_after, expected):
    rec = Recorder(fhir(429, headers={"Retry-After": retry_after}), fhir(200, {"resourceType": "Patient"}))
    sleeps: list[float] = []
    make_client(rec, sleeps, backoff=0.5, max_retry_after=30.0).read("Patient", "a")
    assert sleeps == [expected]


def test_retry_after_http_date_is_honoured():
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    rec = Recorder(fhir(503, headers={"Retry-After": when}), fhir(200, {"resourceType": "Patient"}))
    sleeps: list[float] = []
    make_client(rec, sleeps, max_retry_after=30.0).read("Patient", "a")
    assert 15.0 < sleeps[0] <= 20.0


def test_persistent_429_raises_unavailable_with_issue_codes_and_attempts():
    rec = Recorder(fhir(429, outcome("quota exceeded for client x")))
    sleeps: list[float] = []
    with pytest.raises(FHIRUnavailable) as info:
        make_client(rec, sleeps, retries=2, backoff=0.1).read("Patient", "a")
    assert len(rec.requests) == 3
    assert sleeps == [0.1, 0.2]
    msg = str(info.value)
    assert "after 3 attempts" in msg and "HTTP 429" in msg and "error/processing" in msg
    assert "quota exceeded" not in msg  # diagnostics can echo patient data: never copied
    assert info.value.retryable and info.value.status == 429


def test_connect_error_raises_unavailable_after_all_attempts():
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    sleeps: list[float] = []
    with pytest.raises(FHIRUnavailable) as info:
        make_client(refuse, sleeps, retries=3, backoff=0.25).metadata()
    assert len(calls) == 4
    assert sleeps == [0.25, 0.5, 1.0]
    assert "unreachable" in str(info.value) and "check fhir.base_url" in str(info.value).lower()
    assert "after 4 attempt" in str(info.value)


def test_backoff_is_capped_by_max_retry_after():
    rec = Recorder(fhir(500), fhir(500), fhir(500), fhir(200, {"resourceType": "Patient"}))
    sleeps: list[float] = []
    make_client(rec, sleeps, backoff=4.0, max_retry_after=10.0).read("Patient", "a")
    assert sleeps == [4.0, 8.0, 10.0]


@pytest.mark.parametrize("status, exc", [(400, OperationOutcomeError), (404, ResourceNotFound),
                                         (410, ResourceNotFound), (401, AuthenticationError),
                                         (403, AuthenticationError), (422, OperationOutcomeError),
                                         (412, OperationOutcomeError)])
def test_4xx_maps_to_exception_without_retry(status, exc):
    rec = Recorder(fhir(status, outcome("the server's reason")))
    sleeps: list[float] = []
    with pytest.raises(exc) as info:
        make_client(rec, sleeps).read("Patient", "a")
    assert len(rec.requests) == 1 and sleeps == []
    assert "error/processing" in str(info.value) and "the server's reason" not in str(info.value)
    assert info.value.status == status
    assert not info.value.retryable


def test_404_message_says_what_to_check():
    rec = Recorder(fhir(404, outcome("Unknown resource type")))
    with pytest.raises(ResourceNotFound, match="check fhir.base_url"):
        make_client(rec).read("Patient", "a")


def test_non_json_answer_is_a_clear_error():
    rec = Recorder(httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"}))
    with pytest.raises(FHIRError, match="non-JSON"):
        make_client(rec).metadata()


def test_redirect_is_not_followed_and_explained():
    rec = Recorder(httpx.Response(301, headers={"Location": "https://fhir.test/fhir/metadata"}))
    with pytest.raises(FHIRError, match="HTTP 301"):
        make_client(rec).metadata()


# ---- headers -----------------------------------------------------------------------------------------------


def test_accept_and_content_type_are_fhir_json():
    rec = Recorder(fhir(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": []}))
    client = make_client(rec)
    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
    req = rec.requests[0]
    assert req.method == "POST" and str(req.url) == BASE
    assert req.headers["Accept"] == "application/fhir+json"
    assert req.headers["Content-Type"] == "application/fhir+json"
    assert "Authorization" not in req.headers


def test_invalid_arguments_are_rejected_before_any_request():
    rec = Recorder(fhir(200, {}))
    client = make_client(rec)
    with pytest.raises(ValueError):
        client.read("Patient", "../metadata")
    with pytest.raises(ValueError):
        client.search("patient?x=1", {})
    with pytest.raises(ValueError):
        client.transaction({"resourceType": "Bundle", "type": "batch"})
    with pytest.raises(ValueError):
        FhirClient("fhir.test/fhir")
    assert rec.requests == []


# ---- paging ------------------------------------------------------------------------------------------------


def page(ids: list[str], next_url: str | None, extra: list[dict] | None = None) -> dict:
    entries = [{"resource": {"resourceType": "Observation", "id": i}, "search": {"mode": "match"}}
               for i in ids]
    links = [{"relation": "self", "url": "ignored"}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return {"resourceType": "Bundle", "type": "searchset", "link": links, "entry": entries + (extra or [])}


def test_search_follows_next_links_and_skips_includes_and_outcomes(caplog):
    include = {"resource": {"resourceType": "Patient", "id": "p"}, "search": {"mode": "include"}}
    oo = {"resource": outcome("Unknown search parameter 'foo'"), "search": {"mode": "outcome"}}
    rec = Recorder(fhir(200, page(["1", "2"], f"{BASE}/Observation?_count=2&_offset=2", [include, oo])),
                   fhir(200, page(["3", "4"], "Observation?_count=2&_offset=4")),  # relative link
                   fhir(200, page(["5"], None)))
    client = make_client(rec)
    with caplog.at_level(logging.WARNING, logger="dicom_fusion.fhir.client"):
        params = {"subject": "Patient/x", "date": ["ge2020", "le2021"]}
        ids = [r["id"] for r in client.search("Observation", params)]
    assert ids == ["1", "2", "3", "4", "5"]
    assert len(rec.requests) == 3
    first = parse_qs(rec.requests[0].url.query.decode())
    assert first == {"subject": ["Patient/x"], "date": ["ge2020", "le2021"], "_count": ["200"]}
    assert str(rec.requests[2].url) == f"{BASE}/Observation?_count=2&_offset=4"
    assert "processing" in caplog.text and "foo" not in caplog.text  # issue codes, not diagnostics


def test_search_is_lazy_and_respects_explicit_count():
    rec = Recorder(fhir(200, page(["1"], f"{BASE}/Observation?_offset=1")), fhir(200, page(["2"], None)))
    client = make_client(rec, page_size=50)
    it = client.search("Observation", [("code", "x"), ("_count", "1")])
    assert rec.requests == []
    assert next(it)["id"] == "1"
    assert len(rec.requests) == 1
    assert parse_qs(rec.requests[0].url.query.decode())["_count"] == ["1"]


def test_search_default_page_size_is_configurable():
    rec = Recorder(fhir(200, page([], None)))
    list(make_client(rec, page_size=50).search("Observation"))
    assert parse_qs(rec.requests[0].url.query.decode())["_count"] == ["50"]


def test_search_detects_a_paging_loop():
    loop = f"{BASE}/Observation?_offset=1"
    rec = Recorder(fhir(200, page(["1"], loop)))
    with pytest.raises(FHIRError, match="same next link"):
        list(make_client(rec).search("Observation"))


def test_search_refuses_next_link_to_another_host():
    rec = Recorder(fhir(200, page(["1"], "http://internal:8080/fhir/Observation?_offset=1")))
    with pytest.raises(FHIRError, match="public base URL"):
        list(make_client(rec, auth=FhirAuth("bearer", token="s3cret")).search("Observation"))
    assert len(rec.requests) == 1


def test_search_follows_next_links_of_its_server_when_the_base_url_has_credentials():
    """Servers write paging links without our userinfo (and with or without the default port): same server."""
    rec = Recorder(fhir(200, page(["1"], "http://fhir.test/fhir/Observation?_offset=1")),
                   fhir(200, page(["2"], "http://FHIR.test:80/fhir/Observation?_offset=2")),
                   fhir(200, page(["3"], None)))
    client = FhirClient("http://svc:pw@fhir.test/fhir", transport=httpx.MockTransport(rec), sleep=lambda _: None)
    assert [r["id"] for r in client.search("Observation")] == ["1", "2", "3"]


def test_search_stops_on_empty_page_with_next_link():
    rec = Recorder(fhir(200, page(["1"], f"{BASE}/O?_offset=1")), fhir(200, page([], f"{BASE}/O?_offset=2")))
    assert [r["id"] for r in make_client(rec).search("Observation")] == ["1"]
    assert len(rec.requests) == 2


def test_search_pages_are_retried_individually():
    rec = Recorder(fhir(200, page(["1"], f"{BASE}/Observation?_offset=1")), fhir(503),
                   fhir(200, page(["2"], None)))
    assert [r["id"] for r in make_client(rec).search("Observation")] == ["1", "2"]
    assert len(rec.requests) == 3


def test_search_logs_no_identifier_values(caplog):
    rec = Recorder(fhir(200, page(["1"], None)))
    with caplog.at_level(logging.DEBUG, logger="dicom_fusion.fhir"):
        list(make_client(rec).search("Patient", {"identifier": "urn:oid:1.2|MRN-SECRET-42"}))
    assert caplog.records and "MRN-SECRET-42" not in caplog.text


# ---- auth --------------------------------------------------------------------------------------------------


def test_static_bearer_token_is_sent():
    rec = Recorder(fhir(200, {"resourceType": "CapabilityStatement"}))
    make_client(rec, auth=FhirAuth("bearer", token="abc")).metadata()
    assert rec.requests[0].headers["Authorization"] == "Bearer abc"


class TokenServer:
    """Handler serving a token endpoint and a FHIR endpoint that accepts only the current token."""

    def __init__(self, expires_in: int = 3600, token_status: int = 200):
        self.expires_in = expires_in
        self.token_status = token_status
        self.issued = 0
        self.valid: set[str] = set()
        self.token_requests: list[httpx.Request] = []
        self.fhir_requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            self.token_requests.append(request)
            if self.token_status != 200:
                return httpx.Response(self.token_status, json={"error": "invalid_client",
                                                               "error_description": "bad secret"})
            self.issued += 1
            token = f"tok-{self.issued}"
            self.valid.add(token)
            return httpx.Response(200, json={"access_token": token, "token_type": "bearer",
                                             "expires_in": self.expires_in})
        self.fhir_requests.append(request)
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") not in self.valid:
            return fhir(401, outcome("Access token expired"))
        return fhir(200, {"resourceType": "Patient", "id": "a"})


CC = FhirAuth("client_credentials", token_url="http://auth.test/token", client_id="svc", client_secret="pw",
              scope="system/*.read")


def test_client_credentials_token_is_fetched_with_basic_auth_and_cached(caplog):
    server = TokenServer()
    client = make_client(server, auth=CC)
    with caplog.at_level(logging.DEBUG):
        client.read("Patient", "a")
        client.read("Patient", "a")
    assert len(server.token_requests) == 1
    treq = server.token_requests[0]
    assert treq.method == "POST"
    assert treq.headers["Authorization"] == "Basic " + base64.b64encode(b"svc:pw").decode()
    form = parse_qs(treq.content.decode())
    assert form == {"grant_type": ["client_credentials"], "scope": ["system/*.read"]}
    assert [r.headers["Authorization"] for r in server.fhir_requests] == ["Bearer tok-1", "Bearer tok-1"]
    assert "tok-1" not in caplog.text and "pw" not in caplog.text.split()


def test_rejected_token_is_refreshed_once():
    server = TokenServer()
    client = make_client(server, auth=CC)
    client.read("Patient", "a")
    server.valid.clear()  # the server forgot the token (restart, revocation)
    assert client.read("Patient", "a")["id"] == "a"
    assert len(server.token_requests) == 2
    assert server.fhir_requests[-1].headers["Authorization"] == "Bearer tok-2"


def test_persistent_401_raises_authentication_error_after_one_refresh():
    rec = Recorder(lambda r: httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
                   if r.url.path == "/token" else fhir(401, outcome("invalid token")))
    with pytest.raises(AuthenticationError, match="check fhir.auth"):
        make_client(rec, auth=CC).read("Patient", "a")
    assert [r.url.path for r in rec.requests] == ["/token", "/fhir/Patient/a", "/token", "/fhir/Patient/a"]


def test_token_endpoint_refusal_says_what_to_check():
    server = TokenServer(token_status=401)
    with pytest.raises(AuthenticationError) as info:
        make_client(server, auth=CC).read("Patient", "a")
    msg = str(info.value)
    assert "invalid_client" in msg and "fhir.auth.client_id" in msg and "pw" not in msg.split()
    assert server.fhir_requests == []


def test_token_is_refreshed_sixty_seconds_before_expiry():
    now = [1000.0]
    fetched: list[int] = []

    def fetch() -> tuple[str, float]:
        fetched.append(1)
        return f"t{len(fetched)}", 3600.0

    cache = _TokenCache(fetch, clock=lambda: now[0])
    assert cache.get() == "t1"
    now[0] += 3600 - 61
    assert cache.get() == "t1"
    now[0] += 1
    assert cache.get() == "t2"


def test_short_lived_token_is_reused_for_half_its_life():
    now = [0.0]
    cache = _TokenCache(lambda: ("t", 30.0), clock=lambda: now[0])
    cache.get()
    now[0] = 14.0
    cache.get()
    cache_calls = []
    cache._fetch = lambda: (cache_calls.append(1), ("u", 30.0))[1]  # type: ignore[method-assign]
    now[0] = 15.0
    assert cache.get() == "u" and cache_calls == [1]


@pytest.mark.parametrize("kwargs", [dict(mode="bearer"), dict(mode="client_credentials", client_id="a"),
                                    dict(mode="client_credentials", token_url="ftp://x", client_id="a",
                                         client_secret="b"), dict(mode="kerberos")])
def test_incomplete_auth_settings_are_rejected(kwargs):
    with pytest.raises(ValueError, match="fhir.auth"):
        FhirAuth(**kwargs)


def test_auth_repr_hides_secrets():
    text = repr(FhirAuth("client_credentials", token_url="http://a/t", client_id="id",
                         client_secret="topsecret"))
    assert "topsecret" not in text and "id" in text
    assert "abc123" not in repr(FhirAuth("bearer", token="abc123"))


def test_transaction_body_is_sent_as_json():
    rec = Recorder(fhir(200, {"resourceType": "Bundle", "type": "transaction-response", "entry": []}))
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST",
                                                                                      "url": "Patient"}}]}
    make_client(rec).transaction(bundle)
    assert json.loads(rec.requests[0].content) == bundle
