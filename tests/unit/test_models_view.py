"""The models this deployment serves (ops/served_models.py): `GET /api/models` and the dashboard's `/models` page
list each card the route table names, with its routes, figures and card document; a broken card shows its error."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_api import PASSWORD, TOKEN

from dicom_fusion.inference.card.model import load_card
from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.ops.api.templating import card_html
from dicom_fusion.service.ops.served_models import served_models
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Role
from dicom_fusion.service.storage.users import Users

AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFERENCE = Path(__file__).resolve().parents[2] / "inference"
DEFAULT_CARD = load_card(INFERENCE / "default_model" / "card.toml")
CT_CARD = load_card(INFERENCE / "ct_model" / "card.toml")


def _client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var", api={"token": TOKEN})


def test_lists_the_shipped_models_of_the_implicit_routes(settings: Settings) -> None:
    client = _client(settings)
    assert client.get("/api/models").status_code == 401
    assert client.get("/api/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    res = client.get("/api/models", headers=AUTH)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["error"] is None and body["source"] == "implicit routes (no route configured)"
    by_route = {tuple(m["routes"]): m for m in body["models"]}
    assert list(by_route) == [("default",), ("chest-ct",)]
    for route, card in ((("default",)), DEFAULT_CARD), ((("chest-ct",)), CT_CARD):
        m = by_route[route]
        assert (m["model"], m["version"], m["error"]) == (card.name, card.version, None)
        assert m["threshold"] == card.threshold and m["intended_use"] == card.intended_use
        assert card.calibration is not None and m["calibration"] == card.calibration.describe()
        assert m["document"].startswith(f"# Model card: {card.name} {card.version}")
        assert "not for clinical use" in m["document"] and "## Calibration" in m["document"]
    assert by_route[("default",)]["modalities"] == ["DX", "CR"] and by_route[("chest-ct",)]["modalities"] == ["CT"]
    assert DEFAULT_CARD.calibration is not None and DEFAULT_CARD.calibration.indeterminate is not None
    assert by_route[("default",)]["indeterminate"] == list(DEFAULT_CARD.calibration.indeterminate)


def test_a_broken_card_is_listed_with_its_error_and_the_others_still_show(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('card_format = 1\nname = "half-written"\n')
    settings = load_settings(data_dir=tmp_path / "var", api={"token": TOKEN}, model={"card": bad})
    models = _client(settings).get("/api/models", headers=AUTH).json()["models"]
    assert [m["routes"] for m in models] == [["default"], ["chest-ct"]]
    broken, ct = models
    assert broken["model"] is None and broken["document"] is None and broken["card_path"] == str(bad)
    assert broken["error"].startswith(f"cannot load the model card {bad}")
    assert "missing key version" in broken["error"]
    assert ct["model"] == CT_CARD.name and ct["error"] is None

    missing = load_settings(data_dir=tmp_path / "var", model={"card": tmp_path / "gone.toml", "ct_card": ""})
    [only] = served_models(missing).models
    assert only.routes == ("default",) and only.error is not None and "No such file or directory" in only.error


def test_changed_weights_are_an_error_but_the_card_still_reads(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(INFERENCE / "default_model", copy)
    (copy / "weights.pt").write_bytes(b"not the trained weights")
    settings = load_settings(data_dir=tmp_path / "var", model={"card": copy / "card.toml", "ct_card": ""})
    [m] = served_models(settings).models
    assert m.model == DEFAULT_CARD.name and m.document is not None
    assert m.error is not None and m.error.startswith("weights: ") and "has sha256" in m.error


def test_configured_routes_share_a_card_and_a_bad_route_file_is_the_overview_error(tmp_path: Path) -> None:
    ct = str(INFERENCE / "ct_model" / "card.toml")
    settings = load_settings(data_dir=tmp_path / "var", routes=[
        {"name": "chest-xr", "model": "default", "match": {"Modality": "DX"}},
        {"name": "chest-ct-urgent", "model": ct, "priority": "urgent", "match": {"CallingAE": "ED_CT"}},
        {"name": "nameless-model", "model": 42},
        {"name": "ward-xr", "model": "default"}])
    out = served_models(settings)
    assert out.source == "configuration [[routes]]" and out.error is None
    assert [(m.routes, m.model) for m in out.models] == [
        (("chest-xr", "ward-xr"), DEFAULT_CARD.name), (("chest-ct-urgent",), CT_CARD.name),
        (("nameless-model",), None)]
    assert out.models[-1].error is not None and "a model card path or \"default\", got 42" in out.models[-1].error

    gone = load_settings(data_dir=tmp_path / "var", routing={"file": tmp_path / "routes.toml"})
    out = served_models(gone)
    assert out.models == () and out.error is not None and "cannot read the route file" in out.error


def test_the_models_page_shows_each_card_document_escaped(tmp_path: Path) -> None:
    bad = tmp_path / "<b>bad.toml"  # the error names the path: markup in it must stay text
    bad.write_text('card_format = 1\nname = "half-written"\n')
    settings = load_settings(data_dir=tmp_path / "var", api={"token": TOKEN}, model={"card": bad})
    client = _client(settings)
    res = client.get("/models", follow_redirects=False)
    assert res.status_code == 303 and res.headers["location"] == "/login?next=/models"
    Users(Ledger(settings.ledger_url)).add("viewer", password=PASSWORD, role=Role.VIEWER, display_name="Vi",
                                           by="test")
    client.post("/login", data={"username": "viewer", "password": PASSWORD, "next": "/models"})
    page = client.get("/models")
    assert page.status_code == 200 and 'id="nav-models"' in page.text
    assert f'data-model="{CT_CARD.name}"' in page.text and 'data-route="chest-ct"' in page.text
    assert f"<h3>Model card: {CT_CARD.name} {CT_CARD.version}</h3>" in page.text
    assert "<h4>Calibration</h4>" in page.text and "Not for clinical use." in page.text
    assert re.search(r'class="error model-error">cannot load the model card [^<]*&lt;b&gt;bad\.toml', page.text)
    assert "<b>bad.toml" not in page.text


def test_card_html_escapes_and_keeps_the_document_structure() -> None:
    html = str(card_html("# Model card: a<b> 1\n\n## Limits\n\n- one `dicom-fusion model reference` & more\n"
                         "  continued\n- two\n\ntext <i>\n"))
    assert html == ("<h3>Model card: a&lt;b&gt; 1</h3>\n<h4>Limits</h4>\n<ul><li>one <code>dicom-fusion model "
                    "reference</code> &amp; more\n<br>continued\n</li><li>two\n</li></ul>\n<p>text &lt;i&gt;</p>")
