"""Operator actions on a real SQLite ledger, publishing to the real embedded (filesystem) broker."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from opshelpers import add_study, complete, run_to_dead, run_to_done, run_to_failed

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.errors import ActionRefusedError, StudyNotFoundError
from dicom_fusion.service.ops import operations
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DeliveryState, JobState, Stage


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path / "var")


@pytest.fixture
def ledger(settings: Settings) -> Ledger:
    return Ledger(settings.ledger_url)


@pytest.fixture
def enqueue(ledger: Ledger, settings: Settings) -> operations.Enqueue:
    return operations.make_enqueue(ledger, settings)


def messages(settings: Settings) -> list[tuple[str, str, list[int]]]:
    """(queue, task, args) of every message waiting in the embedded broker."""
    out = []
    for f in sorted((settings.broker_dir / "queue").glob("*.msg")):
        msg = json.loads(f.read_bytes())
        out.append((f.name.split(".")[1], msg["headers"]["task"], msg["headers"]["argsrepr"]))
    return out


def test_retry_dead_job_resets_budget_and_enqueues_its_stage(ledger: Ledger, settings: Settings,
                                                              enqueue: operations.Enqueue) -> None:
    add_study(ledger, "1.1")
    job = complete(ledger, "1.1")
    run_to_dead(ledger, job, stage=Stage.DELIVER, reason="PACS refused")
    result = operations.retry_study(ledger, enqueue, "1.1")
    assert (result.action, result.job_version, result.stage) == ("retry", 1, "deliver")
    row = ledger.job(job)
    assert row is not None and row.state == JobState.QUEUED and row.attempts == 0
    assert {d.kind: d.state for d in ledger.deliveries(job)} == {"sr": DeliveryState.PENDING, "report": "skipped"}
    assert messages(settings) == [("io", "dicom_fusion.deliver", f"[{job}]")]


def test_retry_failed_job_enqueues_now(ledger: Ledger, settings: Settings, enqueue: operations.Enqueue) -> None:
    add_study(ledger, "2.1")
    job = complete(ledger, "2.1")
    run_to_failed(ledger, job, stage=Stage.INFER)
    result = operations.retry_study(ledger, enqueue, "2.1")
    assert "re-enqueued at stage infer now" in result.message
    assert messages(settings) == [("gpu", "dicom_fusion.infer", f"[{job}]")]
    assert "requeued" in [e.event for e in ledger.audit_events("job", job)]


def test_retry_refusals(ledger: Ledger, enqueue: operations.Enqueue) -> None:
    with pytest.raises(StudyNotFoundError, match="no study 9.9"):
        operations.retry_study(ledger, enqueue, "9.9")
    add_study(ledger, "3.1")
    with pytest.raises(ActionRefusedError, match="still receiving"):
        operations.retry_study(ledger, enqueue, "3.1")
    run_to_done(ledger, complete(ledger, "3.1"))
    with pytest.raises(ActionRefusedError, match="is done.*use replay"):
        operations.retry_study(ledger, enqueue, "3.1")


def test_replay_creates_next_version_from_stored_instances(ledger: Ledger, settings: Settings,
                                                           enqueue: operations.Enqueue) -> None:
    add_study(ledger, "4.1", n=3)
    run_to_done(ledger, complete(ledger, "4.1"))
    result = operations.replay_study(ledger, enqueue, "4.1")
    assert (result.action, result.job_version, result.stage) == ("replay", 2, "prepare")
    jobs = ledger.jobs_for_study("4.1")
    assert [(j.version, j.state, j.instance_count) for j in jobs] == [(1, "done", 3), (2, "queued", 3)]
    assert messages(settings) == [("cpu", "dicom_fusion.prepare", f"[{jobs[1].id}]")]
    with pytest.raises(ActionRefusedError, match="job v2 .* is queued; wait"):
        operations.replay_study(ledger, enqueue, "4.1")


def test_replay_refuses_a_study_still_receiving(ledger: Ledger, enqueue: operations.Enqueue) -> None:
    add_study(ledger, "5.1")
    with pytest.raises(ActionRefusedError, match="still receiving"):
        operations.replay_study(ledger, enqueue, "5.1")
    assert ledger.jobs_for_study("5.1") == []


def test_redeliver_dead_letters(ledger: Ledger, settings: Settings, enqueue: operations.Enqueue) -> None:
    for uid in ("6.1", "6.2", "6.3"):
        add_study(ledger, uid)
    a, b, c = (complete(ledger, u) for u in ("6.1", "6.2", "6.3"))
    run_to_dead(ledger, a, stage=Stage.DELIVER)
    run_to_dead(ledger, b, stage=Stage.PREPARE)
    run_to_done(ledger, c)
    with pytest.raises(ActionRefusedError, match="no dead job"):
        operations.redeliver_dead(ledger, enqueue, study_uid="6.3")
    [one] = operations.redeliver_dead(ledger, enqueue, study_uid="6.1")
    assert (one.study_uid, one.stage) == ("6.1", "deliver")
    rest = operations.redeliver_dead(ledger, enqueue)
    assert [(r.study_uid, r.stage) for r in rest] == [("6.2", "prepare")]
    assert sorted(m[1] for m in messages(settings)) == ["dicom_fusion.deliver", "dicom_fusion.prepare"]
    assert operations.redeliver_dead(ledger, enqueue) == []


def test_redeliver_one_job_by_id(ledger: Ledger, settings: Settings, enqueue: operations.Enqueue) -> None:
    """`dicom-fusion redeliver JOB_ID` and the API share this path: dead only, unknown id named."""
    for uid in ("7.1", "7.2"):
        add_study(ledger, uid)
    a, b = (complete(ledger, u) for u in ("7.1", "7.2"))
    run_to_dead(ledger, a, stage=Stage.DELIVER)
    run_to_done(ledger, b)
    with pytest.raises(StudyNotFoundError, match="no job 99999"):
        operations.redeliver_job(ledger, enqueue, 99999)
    with pytest.raises(ActionRefusedError, match="only dead jobs"):
        operations.redeliver_job(ledger, enqueue, b)
    result = operations.redeliver_job(ledger, enqueue, a)
    assert (result.study_uid, result.stage) == ("7.1", "deliver")
    assert f"job {a} (v1) re-enqueued at stage deliver" in result.message
    assert [m[1] for m in messages(settings)] == ["dicom_fusion.deliver"]
