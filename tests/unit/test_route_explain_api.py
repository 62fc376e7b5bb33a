"""The rule tester over the API (`POST /api/routes/explain`, `GET /api/routes/status`) on a real ledger,
real DICOM files and the shipped model card: the same verdicts `serve` would act on."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_instance
from fastapi.testclient import TestClient
from opshelpers import add_study

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.routing.reload import STATUS_FILE, LiveRouter
from dicom_fusion.service.storage.ledger import Ledger

TOKEN = "route-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var", api={"token": TOKEN})


@pytest.fixture
def client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


def test_described_series_get_the_verdicts_serve_would_give(client: TestClient) -> None:
    dx = client.post("/api/routes/explain", headers=AUTH, json={"series": [{"Modality": "DX", "instances": 2}]})
    assert dx.status_code == 200, dx.text
    body = dx.json()
    assert body["ignored"] is None and [j["route"] for j in body["jobs"]] == ["default"]
    assert body["verdicts"][0]["matched"] is True and body["jobs"][0]["model"].startswith("dfusion-hybrid-demo")
    mr = client.post("/api/routes/explain", headers=AUTH, json={"series": [{"Modality": "MR"}]}).json()
    assert mr["jobs"] == [] and "reads DX, CR" in mr["ignored"] and mr["verdicts"][0]["matched"] is False
    assert "route chest-ct: series 1 (MR): Modality MR is not CT" in mr["ignored"]
    ct = client.post("/api/routes/explain", headers=AUTH,
                     json={"series": [{"Modality": "CT", "BodyPartExamined": "CHEST", "instances": 32}]}).json()
    assert [(j["route"], j["model"].split()[0]) for j in ct["jobs"]] == [("chest-ct", "dfusion-ct-demo")]
    one_slice = client.post("/api/routes/explain", headers=AUTH,
                            json={"series": [{"Modality": "CT", "BodyPartExamined": "CHEST"}]}).json()
    assert one_slice["jobs"] == [] and "route chest-ct: series 1 (CT): slices 1 not ≥ 16" in one_slice["ignored"]
    sr = client.post("/api/routes/explain", headers=AUTH,
                     json={"series": [{"Modality": "SR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}]}).json()
    assert sr["jobs"] == [] and sr["ignored"]


def test_an_uploaded_instance_and_a_stored_study(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    f = write_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1", rows=8)
    up = client.post("/api/routes/explain", headers={**AUTH, "Content-Type": "application/dicom"},
                     content=f.read_bytes())
    assert up.status_code == 200 and up.json()["study_uid"] == "1.2.3" and up.json()["jobs"], up.text
    junk = client.post("/api/routes/explain", headers={**AUTH, "Content-Type": "application/dicom"}, content=b"x" * 200)
    assert junk.status_code == 422 and "no readable DICOM" in junk.json()["detail"]
    ledger = Ledger(settings.ledger_url)
    add_study(ledger, "1.4.4", files=tmp_path / "spool")
    stored = client.post("/api/routes/explain", headers=AUTH, json={"study_uid": "1.4.4"}).json()
    assert stored["study_uid"] == "1.4.4" and stored["instances"] == 2 and stored["jobs"]
    assert client.post("/api/routes/explain", headers=AUTH, json={"study_uid": "9.9"}).status_code == 404
    assert client.post("/api/routes/explain", headers={**AUTH, "Content-Type": "text/plain"},
                       content=b"x").status_code == 415
    assert client.post("/api/routes/explain", headers=AUTH, json={"series": [], "bogus": 1}).status_code == 422
    assert client.post("/api/routes/explain", json={"series": [{"Modality": "DX"}]}).status_code == 401


def test_status_shows_the_routes_in_force(client: TestClient, settings: Settings) -> None:
    assert client.get("/api/routes/status", headers=AUTH).status_code == 404
    ledger = Ledger(settings.ledger_url)
    LiveRouter(settings, ledger, status_path=settings.data_dir / STATUS_FILE)
    body = client.get("/api/routes/status", headers=AUTH).json()
    assert body["routes"] == ["default", "chest-ct"] and body["error"] is None


def test_the_dashboard_says_when_a_reload_was_refused(client: TestClient, settings: Settings) -> None:
    import json

    ledger = Ledger(settings.ledger_url)
    LiveRouter(settings, ledger, status_path=settings.data_dir / STATUS_FILE)
    assert 'id="routes-refused"' not in client.get("/dashboard/fragments/overview", headers=AUTH).text
    path = settings.data_dir / STATUS_FILE
    status = json.loads(path.read_text())
    status.update(error="routes.toml: route 'ct': match.Modalty: unknown attribute", error_at="2026-12-02T02:00:00")
    path.write_text(json.dumps(status))
    page = client.get("/dashboard/fragments/overview", headers=AUTH).text
    assert 'id="routes-refused"' in page and "match.Modalty" in page and "stay in force" in page
