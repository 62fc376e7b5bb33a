"""REST API and dashboard through FastAPI's test client, on a real SQLite ledger and the embedded broker."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from opshelpers import add_study, complete, run_to_dead, run_to_done

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.errors import ConfigError
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.ops.api.routes import (
    dashboard,
    health,
    metrics,
    model_cards,
    queues,
    review,
    review_pages,
    session,
    studies,
)
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Role, Stage
from dicom_fusion.service.storage.users import Users

TOKEN = "s3cret-token"
PASSWORD = "a long enough password"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPEN = {"/healthz", "/readyz", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/login"}
PAGES = {"/dashboard", "/review", "/review/1", "/models"}  # HTML pages: redirect to /login instead of 401


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # PACS on a port nobody listens on: readiness must say so.
    return load_settings(data_dir=tmp_path / "var", api={"token": TOKEN}, pacs={"port": free_port()})


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url)


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DICOM_FUSION_API__TOKEN"):
        create_app(load_settings(data_dir=tmp_path))
    app = create_app(load_settings(data_dir=tmp_path, api={"auth": False}))
    assert TestClient(app).get("/api/queues").status_code == 200  # auth off: no token needed
    with pytest.raises(ConfigError, match="cannot read api.token_file"):
        create_app(load_settings(data_dir=tmp_path, api={"token_file": tmp_path / "missing"}))
    (tmp_path / "token").write_text("from-a-secret\n")
    client = TestClient(create_app(load_settings(data_dir=tmp_path, api={"token_file": tmp_path / "token"})))
    assert client.get("/api/queues", headers={"Authorization": "Bearer from-a-secret"}).status_code == 200


def test_every_route_but_health_needs_the_token(client: TestClient) -> None:
    routes = [r for module in (health, studies, queues, review, metrics, dashboard, review_pages, session,
                               model_cards)
              for r in module.router.routes if isinstance(r, APIRoute) and r.path not in OPEN]
    assert len(routes) >= 16
    for r in routes:
        path = r.path.replace("{study_uid}", "1.2.3").replace("{job_id}", "1")
        for method in r.methods:
            res = client.request(method, path, follow_redirects=False)
            if path in PAGES:  # a browser page sends you to the sign-in form
                assert res.status_code == 303 and res.headers["location"].startswith("/login"), (method, path)
                continue
            assert res.status_code == 401, (method, path, res.status_code)
            res = client.request(method, path, headers={"Authorization": "Bearer wrong"}, follow_redirects=False)
            assert res.status_code in (303, 401, 422), (method, path)
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_documents_bearer_auth(client: TestClient) -> None:
    assert client.get("/openapi.json").status_code == 401  # api.docs off: the document needs a token
    spec = client.get("/openapi.json", headers=AUTH).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/api/studies", "/api/studies/{study_uid}", "/api/queues", "/api/studies/{study_uid}/retry",
                 "/api/studies/{study_uid}/replay", "/api/dead-letter/redeliver", "/metrics", "/readyz"):
        assert path in spec["paths"]
    for page in ("/docs", "/redoc"):  # off by default (api.docs): they load scripts from public CDNs
        assert client.get(page).status_code == 404 and client.get(page, headers=AUTH).status_code == 404


def test_readyz_reports_each_dependency(client: TestClient) -> None:
    res = client.get("/readyz")  # without a token: statuses only
    assert res.status_code == 503
    names = ("ledger", "broker", "spool", "pacs", "fhir")
    assert res.json()["checks"] == [{"name": n, "ok": n != "pacs"} for n in names]
    res = client.get("/readyz", headers=AUTH)
    assert res.status_code == 503
    checks = {c["name"]: c for c in res.json()["checks"]}
    assert set(checks) == {"ledger", "broker", "spool", "pacs", "fhir"}
    assert [n for n, c in checks.items() if not c["ok"]] == ["pacs"]
    assert "C-ECHO" in checks["pacs"]["detail"] and "disabled" in checks["fhir"]["detail"]


def test_studies_list_detail_and_errors(client: TestClient, ledger: Ledger) -> None:
    add_study(ledger, "1.2.1", n=3)
    add_study(ledger, "1.2.2")
    run_to_done(ledger, complete(ledger, "1.2.1"))
    page = client.get("/api/studies", headers=AUTH).json()
    assert page["total"] == 2 and [s["study_uid"] for s in page["items"]] == ["1.2.2", "1.2.1"]
    done = client.get("/api/studies", params={"state": "done"}, headers=AUTH).json()
    assert [s["study_uid"] for s in done["items"]] == ["1.2.1"]
    assert client.get("/api/studies", params={"state": "bogus"}, headers=AUTH).status_code == 422
    assert client.get("/api/studies", params={"page_size": 0}, headers=AUTH).status_code == 422
    d = client.get("/api/studies/1.2.1", headers=AUTH).json()
    assert (d["state"], d["instances"], d["errors"]) == ("done", 3, [])
    [job] = d["jobs"]
    assert job["report_id"].startswith("DiagnosticReport/") and job["latency_seconds"] >= 0
    assert [e["event"] for e in job["history"]][-1] == "done"
    assert client.get("/api/studies/9.9.9", headers=AUTH).status_code == 404
    assert client.get("/api/studies/not-a-uid", headers=AUTH).status_code == 422


def test_actions_map_refusals_to_http(client: TestClient, ledger: Ledger, settings: Settings,
                                      tmp_path: Path) -> None:
    add_study(ledger, "1.3.1", files=tmp_path)
    add_study(ledger, "1.3.2")
    run_to_done(ledger, complete(ledger, "1.3.1"))
    dead = complete(ledger, "1.3.2")
    run_to_dead(ledger, dead, stage=Stage.INFER, reason="infer: model card invalid")
    res = client.post("/api/studies/1.3.1/retry", headers=AUTH)
    assert res.status_code == 409 and "use replay" in res.json()["detail"]
    assert client.post("/api/studies/7.7/retry", headers=AUTH).status_code == 404
    assert [f["study_uid"] for f in client.get("/api/dead-letter", headers=AUTH).json()] == ["1.3.2"]
    res = client.post("/api/studies/1.3.2/retry", headers=AUTH)
    assert res.status_code == 200 and res.json()["stage"] == "infer"
    assert len(list((settings.broker_dir / "queue").glob("*.gpu.msg"))) == 1
    res = client.post("/api/studies/1.3.1/replay", headers=AUTH)
    assert res.status_code == 200 and res.json()["job_version"] == 2
    assert client.post("/api/studies/1.3.1/replay", headers=AUTH).status_code == 409
    assert client.post("/api/dead-letter/redeliver", headers=AUTH).json() == {"redelivered": []}


def test_queues_and_metrics(client: TestClient, ledger: Ledger) -> None:
    add_study(ledger, "1.4.1")
    complete(ledger, "1.4.1")
    q = client.get("/api/queues", headers=AUTH).json()
    assert q["broker"] == "filesystem" and q["workers"] is None
    assert {x["name"]: x["waiting"] for x in q["queues"]} == {"cpu": 1, "gpu": 0, "io": 0}
    res = client.get("/metrics", headers=AUTH)
    assert res.headers["content-type"].startswith("text/plain")
    assert 'dicom_fusion_jobs_waiting{queue="cpu"} 1.0' in res.text


def _number(html: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert m, element_id
    return m.group(1).strip()


def sign_in(client: TestClient, ledger: Ledger, role: Role = Role.OPERATOR, username: str = "op") -> str:
    """A user of `role` signed in through the form; returns the page's CSRF token."""
    Users(ledger).add(username, password=PASSWORD, role=role, display_name=f"{username.title()} User", by="test")
    res = client.post("/login", data={"username": username, "password": PASSWORD, "next": "/dashboard"},
                      follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/dashboard"
    cookie = res.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Max-Age=28800" in cookie
    page = client.get("/dashboard")
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert page.status_code == 200 and m
    return m.group(1)


def test_dashboard_sign_in_session_and_fragments(client: TestClient, ledger: Ledger) -> None:
    add_study(ledger, "1.5.1", n=4)
    run_to_done(ledger, complete(ledger, "1.5.1"))
    res = client.get("/dashboard", follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/login?next=/dashboard"
    assert 'name="password"' in client.get("/login").text
    assert client.get("/dashboard", params={"token": TOKEN}, follow_redirects=False).status_code == 303  # no URL tokens
    bad = client.post("/login", data={"username": "op", "password": "wrong password"})
    assert bad.status_code == 401 and "wrong username or password" in bad.text
    csrf = sign_in(client, ledger)
    res = client.get("/dashboard", params={"study": "1.5.1"})
    assert res.status_code == 200 and "Op User · operator" in res.text
    assert (_number(res.text, "kpi-done"), _number(res.text, "kpi-instances")) == ("1", "4")
    assert _number(res.text, "study-state") == "done" and 'data-study="1.5.1"' in res.text
    frag = client.get("/dashboard/fragments/overview")  # the session cookie authenticates the script's fetches
    assert frag.status_code == 200 and _number(frag.text, "kpi-done") == "1"
    assert client.get("/dashboard/fragments/study/4.4").status_code == 404
    # a state-changing request needs the CSRF header; a cross-site form cannot sign anyone in
    assert client.post("/api/studies/1.5.1/retry").status_code == 403
    assert client.post("/api/studies/1.5.1/retry", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.post("/api/studies/1.5.1/retry", headers={"X-CSRF-Token": csrf}).status_code == 409  # allowed
    assert client.post("/login", data={"username": "op", "password": PASSWORD},
                       headers={"Origin": "https://evil.example"}).status_code == 403
    assert client.post("/logout").status_code == 403
    assert client.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    assert client.get("/dashboard/fragments/overview").status_code == 401  # the session ended


def test_review_pages_show_the_result_and_only_reviewers_decide(client: TestClient, ledger: Ledger,
                                                                settings: Settings) -> None:
    from test_review import awaiting

    job = awaiting(ledger, settings, "1.7.1")
    csrf = sign_in(client, ledger, Role.VIEWER, "viewer")
    listing = client.get("/review")
    assert listing.status_code == 200 and f'data-job="{job}"' in listing.text
    page = client.get(f"/review/{job}")
    assert page.status_code == 200 and "Only a reviewer can approve" in page.text and 'id="approve"' not in page.text
    assert "Malignant" in page.text and "0.700" in page.text
    assert client.post(f"/api/review/{job}/approve", json={}, headers={"X-CSRF-Token": csrf}).status_code == 403
    client.cookies.clear()
    csrf = sign_in(client, ledger, Role.REVIEWER, "rev")
    page = client.get(f"/review/{job}")
    assert 'id="approve"' in page.text and 'id="reject"' in page.text
    assert client.post(f"/api/review/{job}/approve", json={}).status_code == 403  # no CSRF header
    res = client.post(f"/api/review/{job}/approve", json={"comment": "ok"}, headers={"X-CSRF-Token": csrf})
    assert res.status_code == 200, res.text
    row = ledger.job(job)
    assert row is not None and row.reviewer == "Rev User"
    assert client.get(f"/review/{job}/overlay.png").status_code == 404  # no overlay written in this test


def test_ignored_studies_are_listed_with_their_reason_and_never_as_failures(client: TestClient,
                                                                              ledger: Ledger) -> None:
    from dicom_fusion.service.storage.models import JobRoute

    add_study(ledger, "1.6.1")
    add_study(ledger, "1.6.2")
    reason = "no route matched: route default: series 1 (MR): model dfusion-hybrid-demo 0.1.0 reads DX, CR"
    ledger.complete_studies(quiet_before=None, study_uids=["1.6.1"], route=lambda _study_id: reason)
    [job_id] = ledger.complete_studies(quiet_before=None, study_uids=["1.6.2"], route=lambda _study_id: JobRoute(
        route="chest", card_path="/models/chest/card.toml", model="chest-xr 2.0", series_uids=("1.6.2.1",)))
    run_to_done(ledger, job_id)
    ignored = client.get("/api/studies", params={"state": "ignored"}, headers=AUTH).json()
    assert [s["study_uid"] for s in ignored["items"]] == ["1.6.1"] and ignored["items"][0]["error"] == reason
    [row] = client.get("/api/studies", params={"state": "done"}, headers=AUTH).json()["items"]
    assert (row["route"], row["model"]) == ("chest", "chest-xr 2.0")
    d = client.get("/api/studies/1.6.2", headers=AUTH).json()
    assert d["jobs"][0]["series_uids"] == ["1.6.2.1"] and d["jobs"][0]["route"] == "chest"
    assert client.get("/api/dead-letter", headers=AUTH).json() == []
    sign_in(client, ledger)
    page = client.get("/dashboard", params={"study": "1.6.1"}).text
    assert _number(page, "kpi-failing") == "0" and "1 ignored by routing" in page
    assert _number(page, "study-state") == "ignored" and "reads DX, CR" in page
    assert "chest-xr 2.0" in page
