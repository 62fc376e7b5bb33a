"""Job priority (README "Routing", "Priority"): the route keys and the calling-AE override, what the ledger
records, which queue each stage message goes to, and the order a worker consumes its queues in. The order
on real brokers is tests/integration/test_priority_queues.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from conftest import write_instance
from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.jobs.queues import (
    InOrderFilesystemTransport,
    consume_order,
    enqueue,
    make_celery,
    priority_queues,
    stage_queue,
)
from dicom_fusion.service.routing.headers import headers_from_files
from dicom_fusion.service.routing.router import Router
from dicom_fusion.service.routing.routes import RouteError, load_routes
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord, Job, Priority, Stage
from dicom_fusion.service.storage.schema import upgrade

ROUTES = """
[[routes]]
name = "ed"
model = "default"
priority = "urgent"
continue = true
[routes.match]
StationName = "ED-XR1"

[[routes]]
name = "xr"
model = "default"
priority_by_calling_ae = { ed_pacs = "urgent", NIGHTLY = "normal" }
[routes.match]
Modality = "DX"

[[routes]]
name = "research"
model = "default"
priority = "background"
[routes.match]
Modality = "CR"
"""


def _settings(tmp_path: Path, routes: str = ROUTES, **routing: object) -> Settings:
    f = tmp_path / "routes.toml"
    f.write_text(routes)
    return load_settings(data_dir=tmp_path / "var", routing={"file": f, **routing})


def _dx(folder: Path, *, modality: str = "DX", station: str = "ROOM2") -> Path:
    from pydicom import dcmread

    sop = generate_uid()
    path = write_instance(folder / f"{sop}.dcm", study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=sop,
                          rows=16, modality=modality)
    ds = dcmread(path)
    ds.StationName = station
    ds.save_as(path, enforce_file_format=True)
    return path


def _priorities(table: object, path: Path, ae: str) -> list[tuple[str, str]]:
    decision = table.decide(headers_from_files([path], calling_ae=ae))  # type: ignore[attr-defined]
    return [(p.route, p.priority) for p in decision.plans]


def test_route_priority_and_the_calling_ae_override(tmp_path: Path) -> None:
    table = load_routes(_settings(tmp_path))
    assert [r.priority for r in table.routes] == ["urgent", "normal", "background"]
    assert _priorities(table, _dx(tmp_path), "MODALITY") == [("xr", "normal")]
    # the route's own table, AE titles compared case-insensitively
    assert _priorities(table, _dx(tmp_path), "ED_PACS") == [("xr", "urgent")]
    assert _priorities(table, _dx(tmp_path, station="ED-XR1"), "MODALITY") == [("ed", "urgent"), ("xr", "normal")]
    assert _priorities(table, _dx(tmp_path, modality="CR"), "MODALITY") == [("research", "background")]


def test_the_global_calling_ae_table_applies_unless_the_route_names_the_ae(tmp_path: Path) -> None:
    table = load_routes(_settings(tmp_path, priority_by_calling_ae={"NIGHTLY": "background", "er": "urgent"}))
    assert _priorities(table, _dx(tmp_path, modality="CR"), "ER") == [("research", "urgent")]
    assert _priorities(table, _dx(tmp_path), "nightly") == [("xr", "normal")]  # the route's entry wins
    assert _priorities(table, _dx(tmp_path, modality="CR"), "NIGHTLY") == [("research", "background")]
    assert _priorities(table, _dx(tmp_path), "OTHER") == [("xr", "normal")]


@pytest.mark.parametrize(("text", "message"), [
    ('priority = "high"', r"route 'x': priority: 'high' is unknown; use one of urgent, normal, background"),
    ('priority_by_calling_ae = { ED = "asap" }', r"route 'x': priority_by_calling_ae\.ED: priority 'asap' is unknown"),
    ('priority_by_calling_ae = "ED"', r"route 'x': priority_by_calling_ae: expected a table"),
    ('priority_by_calling_ae = { "A_TITLE_LONGER_THAN_16" = "urgent" }', r"is not an AE title"),
])
def test_a_bad_priority_is_refused_naming_the_route_and_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(RouteError, match=message):
        load_routes(_settings(tmp_path, f'[[routes]]\nname = "x"\nmodel = "default"\n{text}\n'))


def test_a_bad_global_calling_ae_priority_is_refused(tmp_path: Path) -> None:
    from dicom_fusion.service.errors import ConfigError

    with pytest.raises(ConfigError, match="priority_by_calling_ae"):
        load_settings(data_dir=tmp_path / "var", routing={"priority_by_calling_ae": {"ER": "now"}})


def test_the_ledger_records_the_priority_and_enqueue_sends_to_its_queue(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    upgrade(settings.ledger_url)
    ledger = Ledger(settings.ledger_url)
    router = Router.from_settings(settings, ledger)
    jobs = {}
    for ae, station, modality in (("ED_PACS", "ROOM2", "DX"), ("MODALITY", "ROOM2", "DX"), ("MODALITY", "R", "CR")):
        path = _dx(tmp_path / ae / modality, modality=modality, station=station)
        from pydicom import dcmread

        ds = dcmread(path, stop_before_pixels=True)
        ledger.record_instances([InstanceRecord(
            study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID, modality=ds.Modality, transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            path=path, sha256="0" * 64, size=path.stat().st_size, calling_ae=ae)])
        [job_id] = ledger.complete_studies(quiet_before=None, study_uids=[ds.StudyInstanceUID], route=router)
        jobs[(ae, modality)] = job_id
    urgent, normal, background = jobs[("ED_PACS", "DX")], jobs[("MODALITY", "DX")], jobs[("MODALITY", "CR")]
    with ledger.session() as s:
        assert {j.id: j.priority for j in s.query(Job)} == {urgent: "urgent", normal: "normal", background: "background"}
    assert any("priority=urgent" in e.detail for e in ledger.audit_events("job", urgent))
    app = make_celery(settings)
    for job_id in (urgent, normal, background):
        enqueue(app, ledger, settings, job_id, Stage.PREPARE)
    waiting = sorted(p.name.split(".", 1)[1] for p in (settings.broker_dir / "queue").glob("*.msg"))
    assert waiting == ["cpu.background.msg", "cpu.msg", "cpu.urgent.msg"]
    ref = ledger.claim(urgent, stage=Stage.PREPARE, owner="t", lease_seconds=60)
    assert ref is not None and ref.priority == Priority.URGENT  # the worker publishes the next stages there
    assert ledger.mark_enqueued(background, stage=Stage.PREPARE, lease_seconds=60) == Priority.BACKGROUND
    ledger.close()


def test_queue_names_and_the_order_a_worker_consumes_them_in() -> None:
    assert stage_queue(Stage.PREPARE) == "cpu" and stage_queue(Stage.INFER, Priority.URGENT) == "gpu.urgent"
    assert stage_queue(Stage.DELIVER, "background") == "io.background"
    assert priority_queues("gpu") == ("gpu.urgent", "gpu", "gpu.background")
    # every urgent queue first; within one priority the later stages first (io, gpu, cpu)
    assert consume_order(["cpu", "gpu", "io"]) == [
        "io.urgent", "gpu.urgent", "cpu.urgent", "io", "gpu", "cpu", "io.background", "gpu.background",
        "cpu.background"]
    assert consume_order(["gpu"]) == ["gpu.urgent", "gpu", "gpu.background"]
    assert consume_order(["cpu.urgent", "io.urgent"]) == ["io.urgent", "cpu.urgent"]  # an urgent-only worker


def test_the_celery_app_declares_every_priority_queue_and_polls_in_order(tmp_path: Path) -> None:
    embedded = make_celery(load_settings(data_dir=tmp_path / "var"))
    assert {q.name for q in embedded.conf.task_queues} == {
        q for base in ("cpu", "gpu", "io") for q in priority_queues(base)}
    assert embedded.conf.worker_prefetch_multiplier == 1 and embedded.conf.task_acks_late
    with embedded.connection_for_write() as conn:
        assert isinstance(conn.transport, InOrderFilesystemTransport)
    redis = make_celery(load_settings(data_dir=tmp_path / "var", broker={"url": "redis://127.0.0.1:1/0"}))
    assert redis.conf.broker_transport_options["queue_order_strategy"] == "priority"
