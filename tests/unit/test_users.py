"""Named users, roles and API tokens on a real SQLite ledger: hashes not secrets in the database, a
slowed-down account after repeated wrong passwords, revocation, and the API's role checks (a viewer
cannot approve, an operator cannot review, the reviewer named in the ledger is the signed-in user)."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_review import awaiting

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.errors import ActionRefusedError
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobState, Role, utcnow
from dicom_fusion.service.storage.users import LOCK_AFTER, LOCK_SECONDS, SignInError, Users

SERVICE_TOKEN = "service-token-123"
PASSWORD = "correct horse battery"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var", api={"token": SERVICE_TOKEN})


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url)


@pytest.fixture
def users(ledger: Ledger) -> Users:
    return Users(ledger)


def test_passwords_and_tokens_are_stored_as_hashes(users: Users, settings: Settings) -> None:
    users.add("jsmith", password=PASSWORD, role=Role.REVIEWER, display_name="Jane  Smith", organization="GH", by="t")
    _, token = users.create_token("jsmith", "laptop", by="t")
    db = sqlite3.connect(settings.data_dir / "ledger.sqlite")
    [(hashed,)] = db.execute("SELECT password_hash FROM users").fetchall()
    [(token_hash,)] = db.execute("SELECT token_hash FROM api_tokens").fetchall()
    assert hashed.startswith("$argon2id$") and PASSWORD not in hashed
    assert token.startswith("dfu_") and token not in token_hash and len(token_hash) == 64
    who = users.resolve_token(token)
    assert who is not None and (who.username, who.display_name, who.role, who.organization) == (
        "jsmith", "Jane Smith", Role.REVIEWER, "GH")


@pytest.mark.parametrize(("username", "password", "message"), [
    ("Bad Name", PASSWORD, "username"), ("ok", "short", "at least 10"), ("jsmith", PASSWORD, "exists")])
def test_bad_users_are_refused(users: Users, username: str, password: str, message: str) -> None:
    users.add("jsmith", password=PASSWORD, role=Role.VIEWER, display_name="J S", by="t")
    with pytest.raises(ActionRefusedError, match=message):
        users.add(username, password=password, role=Role.VIEWER, display_name="X Y", by="t")


def test_repeated_wrong_passwords_slow_the_account_down_and_are_audited(users: Users, ledger: Ledger) -> None:
    users.add("jsmith", password=PASSWORD, role=Role.REVIEWER, display_name="J S", by="t")
    assert users.authenticate("jsmith", PASSWORD).username == "jsmith"
    now = utcnow()
    for _ in range(LOCK_AFTER):
        with pytest.raises(SignInError):
            users.authenticate("jsmith", "wrong password!", now=now)
    with pytest.raises(SignInError):  # cooling down: even the right password is refused
        users.authenticate("jsmith", PASSWORD, now=now + timedelta(seconds=1))
    events = [e.detail for e in ledger.audit_events("user", 1)]
    assert sum("wrong password" in d for d in events) == LOCK_AFTER and any("cooling down" in d for d in events)
    assert PASSWORD not in " ".join(events)
    later = now + timedelta(seconds=LOCK_SECONDS + 2)
    assert users.authenticate("jsmith", PASSWORD, now=later).username == "jsmith"
    with pytest.raises(SignInError):
        users.authenticate("nobody", PASSWORD)


def test_disabling_a_user_revokes_its_tokens(users: Users) -> None:
    users.add("op", password=PASSWORD, role=Role.OPERATOR, display_name="O P", by="t")
    token_id, token = users.create_token("op", "ci", by="t")
    users.set_disabled("op", True, by="t")
    assert users.resolve_token(token) is None
    with pytest.raises(SignInError):
        users.authenticate("op", PASSWORD)
    users.set_disabled("op", False, by="t")
    assert users.resolve_token(token) is None  # stays revoked
    _, fresh = users.create_token("op", "ci2", by="t")
    assert users.resolve_token(fresh) is not None
    with pytest.raises(ActionRefusedError, match="no active API token"):
        users.revoke_token(token_id, by="t")


def test_the_api_checks_roles(users: Users, ledger: Ledger, settings: Settings) -> None:
    tokens = {}
    for name, role in (("viewer", Role.VIEWER), ("rev", Role.REVIEWER), ("op", Role.OPERATOR)):
        users.add(name, password=PASSWORD, role=role, display_name=f"{name.title()} Person", organization="GH", by="t")
        tokens[name] = {"Authorization": f"Bearer {users.create_token(name, 'x', by='t')[1]}"}
    service = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    job = awaiting(ledger, settings, "1.9")
    client = TestClient(create_app(settings))
    assert client.get("/api/review", headers=tokens["viewer"]).json()[0]["job_id"] == job
    for who in ("viewer", "op"):
        res = client.post(f"/api/review/{job}/approve", headers=tokens[who], json={})
        assert res.status_code == 403 and "review" in res.json()["detail"]
    assert client.post(f"/api/review/{job}/approve", headers=service, json={}).status_code == 403
    assert client.post("/api/studies/1.9/retry", headers=tokens["rev"]).status_code == 403
    assert client.post("/api/studies/1.9/retry", headers=tokens["op"]).status_code == 409  # allowed; nothing to retry
    assert client.post(f"/api/review/{job}/approve", headers={"Authorization": "Bearer dfu_forged"}).status_code == 401
    res = client.post(f"/api/review/{job}/approve", headers=tokens["rev"],
                      json={"finding": "no-such", "comment": "x"})
    assert res.status_code == 409 and "not a class of" in res.json()["detail"]
    res = client.post(f"/api/review/{job}/approve", headers=tokens["rev"], json={"comment": "agree", "reviewer": "X"})
    assert res.status_code == 422  # a reviewer's name is never taken from the body
    res = client.post(f"/api/review/{job}/approve", headers=tokens["rev"], json={"comment": "agree"})
    assert res.status_code == 200 and res.json()["verdict"] == "approved"
    row = ledger.job(job)
    assert row is not None and (row.state, row.reviewer, row.reviewer_organization) == (
        JobState.QUEUED, "Rev Person", "GH")
    res = client.post(f"/api/review/{job}/reject", headers=tokens["rev"], json={})
    assert res.status_code == 409 and "not awaiting review" in res.json()["detail"]


def test_users_cli_adds_lists_and_issues_a_token_shown_once(tmp_path: Path, settings: Settings) -> None:
    env = {"DICOM_FUSION_DATA_DIR": str(settings.data_dir), "PATH": "/usr/bin:/bin"}

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "users", *args], input=stdin,
                              env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    Ledger(settings.ledger_url).close()
    done = cli("add", "jsmith", "--role", "reviewer", "--name", "Jane Smith", "--password-stdin", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert cli("add", "jsmith", "--role", "viewer", "--name", "X", "--password-stdin",
               stdin=PASSWORD + "\n").returncode == 1
    made = cli("token", "jsmith", "--name", "laptop")
    assert made.returncode == 0 and made.stdout.strip().startswith("dfu_")
    listing = cli("list")
    assert "jsmith" in listing.stdout and "reviewer" in listing.stdout and made.stdout.strip() not in listing.stdout
    who = Users(Ledger(settings.ledger_url)).resolve_token(made.stdout.strip())
    assert who is not None and who.display_name == "Jane Smith"


def test_users_create_list_and_revoke_their_own_tokens(users: Users, settings: Settings) -> None:
    users.add("jsmith", password=PASSWORD, role=Role.REVIEWER, display_name="Jane Smith", by="t")
    users.add("other", password=PASSWORD, role=Role.VIEWER, display_name="O T", by="t")
    _, other_token = users.create_token("other", "x", by="t")
    client = TestClient(create_app(settings))
    bootstrap = {"Authorization": f"Bearer {users.create_token('jsmith', 'first', by='t')[1]}"}
    assert client.get("/api/me", headers=bootstrap).json()["display_name"] == "Jane Smith"
    made = client.post("/api/me/tokens", headers=bootstrap, json={"name": "script"})
    assert made.status_code == 201 and made.json()["token"].startswith("dfu_")
    mine = {"Authorization": f"Bearer {made.json()['token']}"}
    listed = client.get("/api/me/tokens", headers=mine).json()
    assert [t["name"] for t in listed] == ["first", "script"] and all("token" not in t for t in listed)
    other_id = users.tokens("other")[0].id
    assert client.delete(f"/api/me/tokens/{other_id}", headers=mine).status_code == 409  # not yours
    assert users.resolve_token(other_token) is not None
    assert client.delete(f"/api/me/tokens/{made.json()['id']}", headers=bootstrap).status_code == 204
    assert client.get("/api/me", headers=mine).status_code == 401  # revoked
    service = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    assert client.post("/api/me/tokens", headers=service, json={}).status_code == 409  # the service token has no account


def test_a_trusted_proxy_names_the_user_and_nobody_else_can(users: Users, tmp_path: Path) -> None:
    users.add("jsmith", password=PASSWORD, role=Role.OPERATOR, display_name="Jane Smith", by="t")
    base = {"data_dir": tmp_path / "var", "api": {"token": SERVICE_TOKEN, "trusted_user_header": "X-Remote-User"}}
    untrusted = TestClient(create_app(load_settings(**base)))
    assert untrusted.get("/api/me", headers={"X-Remote-User": "jsmith"}).status_code == 401  # not from a proxy
    proxied = TestClient(create_app(load_settings(**{**base, "api": {**base["api"], "trusted_proxies": ["testclient"]}})))
    assert proxied.get("/api/me", headers={"X-Remote-User": "jsmith"}).json()["username"] == "jsmith"
    assert proxied.get("/api/me", headers={"X-Remote-User": "nobody"}).status_code == 401
    page = proxied.get("/dashboard", headers={"X-Remote-User": "jsmith"}, follow_redirects=False)
    assert page.status_code == 200 and "Jane Smith" in page.text
    cross = proxied.post("/api/dead-letter/redeliver", headers={"X-Remote-User": "jsmith",
                                                                "Origin": "https://evil.example"})
    assert cross.status_code == 403


def test_operator_actions_are_audited_with_the_user(users: Users, ledger: Ledger, settings: Settings) -> None:
    from opshelpers import add_study, complete, run_to_dead

    from dicom_fusion.service.storage.models import Stage

    users.add("olga", password=PASSWORD, role=Role.OPERATOR, display_name="Olga O", by="t")
    auth = {"Authorization": f"Bearer {users.create_token('olga', 'x', by='t')[1]}"}
    add_study(ledger, "1.8")
    job = complete(ledger, "1.8")
    run_to_dead(ledger, job, stage=Stage.DELIVER, reason="PACS refused")
    client = TestClient(create_app(settings))
    assert client.post("/api/studies/1.8/retry", headers=auth).status_code == 200
    assert [e.detail for e in ledger.audit_events("job", job) if e.event == "operator_retry"] == ["by=olga"]
