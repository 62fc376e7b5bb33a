"""Schema-driven fuzz of every documented API route (schemathesis, in-process over ASGI).

Each operation of the OpenAPI document is called with inputs generated from its schema — valid ones and,
with a token, invalid ones too (wrong types, out-of-range numbers, patterns broken, extreme dates) — on a
ledger holding a done, a dead and an ignored study so the read models have rows to serialise. Two
properties hold for every call:

- no 5xx but the documented 503 (a dependency down: /readyz with no PACS, an action with no broker);
- without a token, or with a wrong one, every route but the open ones (:data:`OPEN`) answers 401.

Bounded: a few examples per operation, no shrinking, derandomised (the same cases every run), so the
whole module stays well under a minute on two cores. Routes outside the document (the dashboard's HTML
pages, sign-in) are covered by tests/unit/test_api.py's walk over every route.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from opshelpers import add_study, complete, run_to_dead, run_to_done
from schemathesis import GenerationMode

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Stage

TOKEN = "fuzz-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: The routes README "Security" documents as open: liveness and statuses-only readiness.
OPEN = {"/healthz", "/readyz"}
EXAMPLES = 12  # per operation and mode: ~17 operations x (2 modes + unauthenticated) in well under a minute

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    tmp = tmp_path_factory.mktemp("fuzz")
    # PACS on a port nobody listens on, FHIR off: /readyz answers 503, as documented
    s = load_settings(data_dir=tmp / "var", api={"token": TOKEN}, pacs={"port": free_port(), "timeout": 1})
    ledger = Ledger(s.ledger_url)
    add_study(ledger, "1.2.1", n=3)
    run_to_done(ledger, complete(ledger, "1.2.1"))
    add_study(ledger, "1.2.2")
    run_to_dead(ledger, complete(ledger, "1.2.2"), stage=Stage.INFER, reason="infer: model card invalid")
    add_study(ledger, "1.2.3")
    ledger.complete_studies(quiet_before=None, study_uids=["1.2.3"], route=lambda _: "no route matched")
    add_study(ledger, "1.2.4")  # still receiving
    ledger.close()
    return create_app(s)


@pytest.fixture(scope="module")
def operations(app: FastAPI) -> list[Any]:
    """Every operation of the document the app serves (read with the token: it is not public)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=AUTH)
    return [result.ok() for result in schema.get_all_operations()]


def _documented(case: Any, code: int) -> bool:
    return str(code) in (case.operation.definition.raw.get("responses") or {})


def _fuzz(operations: list[Any], mode: GenerationMode, check: Callable[[Any], None]) -> dict[str, int]:
    """Run ``check`` on generated cases of every operation; returns calls per operation. The strategies
    are driven by hypothesis directly (schemathesis' lazy pytest loader does not run on pytest 9), so a
    failure names its operation and hypothesis prints the falsifying case."""
    calls: dict[str, int] = {}
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not _has_inputs(op):
            continue  # nothing to make invalid (/healthz): hypothesis would find no case at all
        @FUZZ
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            calls[op.label] = calls.get(op.label, 0) + 1
            check(case)

        run()
    return calls


def _has_inputs(op: Any) -> bool:
    return any(len(params) for params in (op.path_parameters, op.query, op.body))


def _no_server_error(case: Any) -> None:
    res = case.call(headers=AUTH)
    assert res.status_code < 500 or (res.status_code == 503 and _documented(case, 503)), \
        (case.method, case.formatted_path, case.query, res.status_code, res.text[:300])
    assert res.headers.get("x-content-type-options") == ["nosniff"]  # every response, errors too


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_with_a_token(operations: list[Any], mode: GenerationMode) -> None:
    started = time.monotonic()
    calls = _fuzz(operations, mode, _no_server_error)
    expected = [op for op in operations if mode is GenerationMode.POSITIVE or _has_inputs(op)]
    assert len(calls) == len(expected) and len(expected) >= 7 and min(calls.values()) >= 1, calls
    print(f"\nfuzz {mode}: {len(calls)} operations, {sum(calls.values())} calls with a token, "
          f"{time.monotonic() - started:.1f} s")


def _closed_without_a_token(case: Any) -> None:
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    for headers in ({}, {"Authorization": "Bearer wrong-token"}):
        res = case.call(headers=headers)
        if case.path in OPEN:
            assert res.status_code in (200, 503), (case.path, res.status_code)
            if case.path == "/readyz":  # statuses only: no detail, timing or path without a token
                assert all(set(c) == {"name", "ok"} for c in res.json()["checks"]), res.text
        else:
            assert res.status_code == 401, (case.method, case.formatted_path, res.status_code, res.text[:300])


def test_nothing_but_the_open_routes_answers_without_a_token(operations: list[Any]) -> None:
    started = time.monotonic()
    calls = _fuzz(operations, GenerationMode.POSITIVE, _closed_without_a_token)
    assert len(calls) == len(operations) and min(calls.values()) >= 1, calls
    print(f"\nfuzz without a token: {len(calls)} operations, {2 * sum(calls.values())} calls, "
          f"{time.monotonic() - started:.1f} s")


def test_the_fuzz_sees_every_documented_operation(app: FastAPI, operations: list[Any]) -> None:
    spec = TestClient(app).get("/openapi.json", headers=AUTH).json()
    documented = {f"{m.upper()} {p}" for p, ops in spec["paths"].items() for m in ops}
    assert {op.label for op in operations} == documented
    assert {"GET /api/studies", "POST /api/studies/{study_uid}/replay", "GET /readyz"} <= documented


#: Values at and past the edges of each parameter type, which random generation rarely reaches:
#: integers past 64 bits, times whose offset leaves the calendar once converted to UTC.
EDGES: dict[str, list[str]] = {
    "integer": ["99999999999999999999", str(2**63), str(2**63 - 1), str(-(2**63) - 1), "0", "-1", "1.5", ""],
    "number": ["1e400", "-1e400", "nan", "inf", ""],
    "date-time": ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00",
                  "9999-12-31T23:59:59.999999", "2024-02-30T00:00:00", "1e9", ""],
    "string": ["", "\x00", "%", "../..", "9" * 5000, "1." * 40],
}


def _kind(schema: dict[str, Any]) -> str:
    options = schema.get("anyOf") or [schema]
    for option in options:
        if option.get("format") == "date-time":
            return "date-time"
        if option.get("type") in ("integer", "number"):
            return str(option["type"])
    return "string"


def test_edge_values_of_every_parameter(app: FastAPI) -> None:
    """Every query and path parameter of the document, one edge value at a time, with a token."""
    client = TestClient(app)
    spec = client.get("/openapi.json", headers=AUTH).json()
    tried = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            params = [p for p in op.get("parameters", []) if p["in"] in ("query", "path")]
            filled = {p["name"]: "1.2.1" if p["name"] == "study_uid" else "1" for p in params if p["in"] == "path"}
            for param in params:
                for value in EDGES[_kind(param.get("schema", {}))]:
                    values = {**filled, param["name"]: value}
                    url = path.format(**{k: quote(v, safe="") for k, v in values.items()}) \
                        if param["in"] == "path" else path.format(**filled)
                    query = {param["name"]: value} if param["in"] == "query" else None
                    res = client.request(method.upper(), url, params=query, headers=AUTH)
                    tried += 1
                    assert res.status_code < 500 or (res.status_code == 503 and "503" in op["responses"]), \
                        (method, path, param["name"], value[:40], res.status_code, res.text[:300])
    assert tried >= 40, tried


@pytest.mark.parametrize("query", [{"page": "99999999999999999999"}, {"page": str(2**63)},
                                   {"received_after": "0001-01-01T00:00:00+14:00"},
                                   {"received_before": "9999-12-31T23:59:59-14:00"},
                                   {"page_size": "1e400"}, {"state": "\x00"}])
def test_the_reported_edges_are_422_not_500(app: FastAPI, query: dict[str, str]) -> None:
    res = TestClient(app).get("/api/studies", params=query, headers=AUTH)
    assert res.status_code == 422, (query, res.status_code, res.text)


def test_received_times_with_an_offset_are_compared_in_utc(app: FastAPI) -> None:
    client = TestClient(app)
    everything = client.get("/api/studies", headers=AUTH).json()["total"]
    assert everything == 4
    # the same instant written in two offsets selects the same studies
    a = client.get("/api/studies", params={"received_after": "2000-01-01T02:00:00+02:00"}, headers=AUTH).json()
    b = client.get("/api/studies", params={"received_after": "2000-01-01T00:00:00Z"}, headers=AUTH).json()
    assert a["total"] == b["total"] == everything
    far = client.get("/api/studies", params={"received_after": "9999-12-31T23:00:00-10:00"}, headers=AUTH)
    assert far.status_code == 422 and "outside years" in far.text
    none = client.get("/api/studies", params={"received_before": "0001-01-02T00:00:00+14:00"}, headers=AUTH)
    assert none.status_code == 200 and none.json()["total"] == 0
