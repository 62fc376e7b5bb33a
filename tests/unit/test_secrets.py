"""No secrets where they do not belong (issue 18, item 3): URLs are shown without userinfo by
`dicom-fusion config`, readiness, the API and FHIR errors; the access log redacts tokens by decoded
parameter name."""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opshelpers import add_study, complete, run_to_done
from typer.testing import CliRunner

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.fhir.errors import FHIRError
from dicom_fusion.service.cli import app as cli_app
from dicom_fusion.service.config import load_settings, redact_url
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.ops.logredact import RedactQuerySecrets, redact_query_secrets
from dicom_fusion.service.ops.readiness import check_fhir, readiness
from dicom_fusion.service.storage.ledger import Ledger

SECRETS = ("fhirpw", "oauthpw", "redispw", "dbpw")
TOKEN = "api-token-1"


class _Metadata(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fhir_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def _no_secret(text: str) -> None:
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{leaked} in {text!r}"


@pytest.mark.parametrize("url, shown", [
    ("https://svc:fhirpw@ehr.example/fhir", "https://***@ehr.example/fhir"),
    ("redis://:redispw@redis:6379/0", "redis://***@redis:6379/0"),
    ("https://ehr.example/fhir", "https://ehr.example/fhir"),
    ("", ""),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_config_output_shows_no_userinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    env = {"DICOM_FUSION_DATA_DIR": str(tmp_path), "DICOM_FUSION_FHIR__BASE_URL": "https://svc:fhirpw@ehr/fhir",
           "DICOM_FUSION_FHIR__TOKEN_URL": "https://cid:oauthpw@auth/token",
           "DICOM_FUSION_BROKER__URL": "redis://:redispw@redis:6379/0",
           "DICOM_FUSION_LEDGER__URL": "postgresql://df:dbpw@db/df"}
    result = CliRunner().invoke(cli_app, ["config"], env=env)
    assert result.exit_code == 0, result.output
    _no_secret(result.output)
    shown = json.loads(result.output)
    assert shown["fhir"]["base_url"] == "https://***@ehr/fhir"
    assert shown["broker"]["url"] == "redis://***@redis:6379/0"
    assert shown["ledger"]["url"] == "postgresql://***@db/df"


def test_readiness_shows_the_fhir_server_without_userinfo(tmp_path: Path, fhir_port: int) -> None:
    up = load_settings(data_dir=tmp_path, fhir={"base_url": f"http://svc:fhirpw@127.0.0.1:{fhir_port}/fhir"})
    detail = check_fhir(up)
    assert detail.startswith(f"http://***@127.0.0.1:{fhir_port}/fhir FHIR 4.0.1")
    down = load_settings(data_dir=tmp_path, pacs={"port": free_port()},
                         fhir={"base_url": f"http://svc:fhirpw@127.0.0.1:{free_port()}/fhir"})
    checks = {c.name: c for c in readiness(Ledger(down.ledger_url), down)}
    assert not checks["fhir"].ok
    _no_secret(json.dumps([c.__dict__ for c in checks.values()]))


def test_fhir_errors_show_no_userinfo() -> None:
    client = FhirClient(f"http://svc:fhirpw@127.0.0.1:{free_port()}/fhir", retries=0, timeout=1)
    with pytest.raises(FHIRError) as caught:
        client.metadata()
    _no_secret(str(caught.value))
    assert "***@127.0.0.1" in str(caught.value)


def test_api_report_url_and_readyz_show_no_userinfo(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", api={"token": TOKEN}, pacs={"port": free_port()},
                             fhir={"base_url": f"http://svc:fhirpw@127.0.0.1:{free_port()}/fhir"})
    ledger = Ledger(settings.ledger_url)
    add_study(ledger, "1.2.7")
    run_to_done(ledger, complete(ledger, "1.2.7"))
    client = TestClient(create_app(settings))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    study = client.get("/api/studies/1.2.7", headers=auth)
    assert study.status_code == 200
    [job] = study.json()["jobs"]
    assert job["report_url"].startswith("http://***@127.0.0.1:")
    _no_secret(study.text)
    for headers in ({}, auth):
        _no_secret(client.get("/readyz", headers=headers).text)


@pytest.mark.parametrize("line, expected", [
    ("GET /dashboard?token=abc HTTP/1.1", "GET /dashboard?token=*** HTTP/1.1"),
    ("/dashboard?tok%65n=abc&x=1", "/dashboard?tok%65n=***&x=1"),
    ("/dashboard?x=1&TOKEN=abc", "/dashboard?x=1&TOKEN=***"),
    ("/dashboard?to%256Ben=abc", "/dashboard?to%256Ben=***"),  # double-encoded 'k'
    ("/dashboard?%74oken=abc;access_token=def", "/dashboard?%74oken=***;access_token=***"),
    ("/dashboard?to+ken=abc", "/dashboard?to+ken=abc"),  # another name ("to ken"): left alone
    ("/api/studies?page=2&state=done", "/api/studies?page=2&state=done"),
    ("/dashboard?tokens=abc", "/dashboard?tokens=abc"),
])
def test_query_secrets_are_redacted_by_decoded_name(line: str, expected: str) -> None:
    assert redact_query_secrets(line) == expected


def test_access_log_filter_redacts_uvicorn_arguments(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.uvicorn.access")
    logger.addFilter(RedactQuerySecrets())
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/dashboard?tok%65n=SEKRIT", "1.1", 200)
    assert "SEKRIT" not in caplog.text and "tok%65n=***" in caplog.text
