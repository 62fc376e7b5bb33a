"""Operator commands' refusals and failure paths (the happy paths run in tests/e2e/test_operate.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_instance
from opshelpers import add_study, complete, run_to_dead
from typer.testing import CliRunner

from dicom_fusion.service.cli import app
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Stage


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    monkeypatch.delenv("DICOM_FUSION_API__TOKEN", raising=False)
    monkeypatch.setenv("DICOM_FUSION_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("COLUMNS", "200")
    return tmp_path / "var"


def test_api_refuses_an_empty_token(env: Path) -> None:
    res = CliRunner().invoke(app, ["api"])
    assert res.exit_code == 2
    assert "DICOM_FUSION_API__TOKEN" in res.output and "[api]" in res.output


def test_send_reports_what_is_wrong(env: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not DICOM")
    res = runner.invoke(app, ["send", str(tmp_path / "empty")])
    assert res.exit_code == 2 and "no DICOM files" in res.output
    write_instance(tmp_path / "study" / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1")
    res = runner.invoke(app, ["send", str(tmp_path / "study"), "--port", str(free_port()), "--timeout", "2"])
    assert res.exit_code == 1 and "Could not connect" in res.output


def test_status_retry_and_replay_against_the_ledger(env: Path) -> None:
    ledger = Ledger(f"sqlite:///{env / 'ledger.sqlite'}")
    add_study(ledger, "1.9.1", files=env / "spool")  # a replay routes the study again: it reads the headers
    run_to_dead(ledger, complete(ledger, "1.9.1"), stage=Stage.TIMELINE, reason="timeline: FHIR refused [403]")
    runner = CliRunner()
    res = runner.invoke(app, ["status"])
    assert res.exit_code == 0, res.output
    assert "1.9.1" in res.output and "FHIR refused [403]" in res.output  # reasons are printed verbatim
    res = runner.invoke(app, ["replay", "1.9.1"])
    assert res.exit_code == 0 and "job v2 created" in res.output
    res = runner.invoke(app, ["retry", "1.9.1"])
    assert res.exit_code == 1 and "is queued" in res.output
    res = runner.invoke(app, ["retry", "4.4.4"])
    assert res.exit_code == 1 and "no study 4.4.4" in res.output
