"""Drift monitoring end to end (README "Drift"): a reference built with `reference_from_cohort` from synthetic
studies, then a window of deliberately shifted studies (pixel values x 3 through RescaleSlope, the glucose lab
removed from every bundle) sent through the real prepare and infer stages; the ledger's observations, the
/metrics gauge, the dashboard's Model drift section and the shipped alert rule all see the drift."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from pathlib import Path

import pydicom
import pytest
import yaml
from fastapi.testclient import TestClient
from opshelpers import OWNER
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dicom_fusion.fhir.events import events_from_bundle
from dicom_fusion.fhir.timeline import Timeline
from dicom_fusion.inference.card.drift import DRIFT, psi
from dicom_fusion.inference.card.model import write_card
from dicom_fusion.inference.nets.hybrid import init_model
from dicom_fusion.inference.serve.drift_items import cohort_items, reference_from_cohort, samples_of
from dicom_fusion.inference.serve.predict import Predictor
from dicom_fusion.inference.synth.generate import generate_cohort
from dicom_fusion.service.config import load_settings
from dicom_fusion.service.jobs import stages
from dicom_fusion.service.jobs.resource_log import write_timeline_record
from dicom_fusion.service.jobs.worker import WorkerRuntime
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.ops.drift import model_drift
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DriftObservation, InstanceRecord, JobRef, Stage

ROOT = Path(__file__).resolve().parents[2]
GLUCOSE = "2345-7"
N_REFERENCE, WINDOW, BINS = 40, 20, 3  # small for a fast test; the service's defaults are 10 bins, 200 jobs
TOKEN = "drift-token"


def _shift(cohort: Path) -> None:
    """Every study's pixels x 3 in modality units (RescaleSlope 3: a detector whose scale changed) and every
    glucose Observation removed from the bundles (a lab feed that stopped)."""
    for dcm in cohort.glob("*/study/*.dcm"):
        ds = pydicom.dcmread(dcm)
        ds.RescaleSlope = "3"
        ds.save_as(dcm)
    for bundle in cohort.glob("*/bundle.json"):
        data = json.loads(bundle.read_text())
        data["entry"] = [e for e in data["entry"] if not (
            e["resource"]["resourceType"] == "Observation"
            and any(c.get("code") == GLUCOSE for c in e["resource"]["code"]["coding"]))]
        bundle.write_text(json.dumps(data))


def _run_job(rt: WorkerRuntime, patient: Path) -> JobRef:
    """One patient's study through the ledger and the real prepare and infer stages; the timeline stage's
    output is written from the patient's bundle with the serving EHR reader (the FHIR fetch is what is left
    out)."""
    card = rt.models().card
    for source in sorted((patient / "study").glob("*.dcm")):
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        dcm = Path(rt.spool.root) / "instances" / f"{ds.SOPInstanceUID}.dcm"  # where the listener files them
        dcm.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dcm)
        rt.ledger.record_instances([InstanceRecord(
            study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), modality=str(ds.Modality),
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), path=dcm, sha256="0" * 64, size=dcm.stat().st_size,
            calling_ae="MODALITY")])
    [job_id] = rt.ledger.complete_studies(quiet_before=None, study_uids=[str(ds.StudyInstanceUID)])
    rt.ledger.mark_enqueued(job_id, stage=Stage.PREPARE, lease_seconds=300)
    job = rt.ledger.claim(job_id, stage=Stage.PREPARE, owner=OWNER, lease_seconds=300)
    assert job is not None and stages.prepare(rt, job) == Stage.TIMELINE
    events = events_from_bundle(json.loads((patient / "bundle.json").read_text()),
                                resource_types=card.timeline.resource_types,
                                target_units=card.timeline.target_units, value_bounds=card.timeline.value_bounds)
    record = {"status": "ok", "timeline": Timeline("ok", patient.name).to_dict()}
    write_timeline_record(rt.spool.job_dir(job_id) / "timeline.json", record, events, fsync=False)
    assert rt.ledger.advance(job_id, owner=OWNER, next_stage=Stage.INFER, lease_seconds=300)
    job = rt.ledger.claim(job_id, stage=Stage.INFER, owner=OWNER, lease_seconds=300)
    assert job is not None and stages.infer(rt, job) == Stage.DELIVER
    return job


def _alert_rule() -> tuple[str, float, str]:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    [rule] = [r for g in rules["groups"] for r in g["rules"] if r["alert"] == "ModelInputDrift"]
    m = re.fullmatch(r"max by \(model, version, item\) \((\w+)\) > ([0-9.]+)", rule["expr"])
    assert m, rule["expr"]
    return m.group(1), float(m.group(2)), rule["for"]


def test_a_shifted_window_drifts_in_the_ledger_metrics_dashboard_and_alert(tmp_path: Path) -> None:
    started = time.monotonic()
    card = init_model(tmp_path / "model", seed=0)  # untrained but deterministic: the items need no skill
    generate_cohort(N_REFERENCE, tmp_path / "reference", seed=11, progress=False)
    generate_cohort(WINDOW, tmp_path / "production", seed=12, progress=False)  # other patients, same population
    predictor = Predictor.load(card.path, device="cpu")
    reference = reference_from_cohort(predictor, tmp_path / "reference", read_events=events_from_bundle, bins=BINS,
                                      window=WINDOW, progress=False)
    assert reference.source == f"reference ({N_REFERENCE} patients)"
    write_card(dataclasses.replace(card, drift=reference), card.path)

    # unshifted control: new patients of the same population stay under the drift threshold on the two items the
    # shift moves (on 20 patients the others are noisy: image.std and probability reached 0.27-0.38 in trials,
    # which is why the service exports PSI only for a full window of drift.window = 200 jobs by default)
    unshifted = cohort_items(predictor, tmp_path / "production", read_events=events_from_bundle, progress=False)
    control = samples_of(unshifted)
    control_psi = {name: psi(reference.items[name], control[name])
                   for name in ("image.mean", "image.std", "coverage.glucose", "probability")}
    assert control_psi["image.mean"] < DRIFT and control_psi["coverage.glucose"] < DRIFT, control_psi

    _shift(tmp_path / "production")
    settings = load_settings(data_dir=tmp_path / "var", model={"card": card.path, "explain": False, "device": "cpu"},
                             api={"token": TOKEN})
    rt = WorkerRuntime(settings, app=None)  # type: ignore[arg-type]
    patients = sorted(p for p in (tmp_path / "production").iterdir() if (p / "study").is_dir())
    refs = [_run_job(rt, p) for p in patients]
    jobs = [r.job_id for r in refs]

    # the stages recorded, once per job, what `dicom-fusion model reference` computes for the unshifted studies
    # changed only by the shift: intensity statistics x 3, glucose neither covered nor valued
    with rt.ledger.session() as s:
        rows = {o.job_id: json.loads(o.items) for o in s.scalars(select(DriftObservation))}
    assert sorted(rows) == sorted(jobs)
    for job_id, before in zip(jobs, unshifted, strict=True):
        expected = {**before, "image.mean": 3 * before["image.mean"], "image.std": 3 * before["image.std"],
                    "coverage.glucose": 0.0}
        expected.pop("value.glucose", None)
        expected.pop("probability")  # the network read another timeline
        got = dict(rows[job_id])
        assert 0.0 <= got.pop("probability") <= 1.0
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert stages.infer(rt, refs[0]) == Stage.DELIVER  # a redelivered infer stage records nothing more
    with rt.ledger.session() as s:
        assert s.scalar(select(func.count(DriftObservation.id))) == WINDOW

    [drift] = model_drift(rt.ledger, settings)
    assert drift.full and drift.observations == WINDOW and drift.reference == reference.source
    by_item = {i.item: i for i in drift.items}
    assert by_item["image.mean"].psi > DRIFT and by_item["image.mean"].status == "drift"
    assert by_item["image.std"].psi > DRIFT
    assert by_item["coverage.glucose"].psi > DRIFT and by_item["coverage.glucose"].status == "drift"
    assert by_item["value.glucose"].status is None and by_item["value.glucose"].values == 0

    # /metrics: the gauge the alert reads
    client = TestClient(create_app(settings))
    text = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    gauge = {s.labels["item"]: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
             if s.name == "dicom_fusion_model_drift_psi"}
    assert gauge["image.mean"] == pytest.approx(by_item["image.mean"].psi)
    assert "value.glucose" not in gauge  # no value in the window: no PSI, no series
    # the shipped alert rule fires on exactly the drifted items (promtool is not installed here)
    metric, threshold, hold = _alert_rule()
    assert (metric, threshold, hold) == ("dicom_fusion_model_drift_psi", DRIFT, "15m")
    firing = sorted(item for item, value in gauge.items() if value > threshold)
    assert {"image.mean", "image.std", "coverage.glucose"} <= set(firing)

    # the dashboard's Model drift section
    frag = client.get("/dashboard/fragments/overview", headers={"Authorization": f"Bearer {TOKEN}"}).text
    section = frag[frag.index('id="drift"'):frag.index('id="recent"')]
    assert f"last {WINDOW} jobs" in section and f"reference {reference.source}" in section
    row = re.search(r'data-item="image.mean">.*?class="num psi">([0-9.]+)<.*?badge drift-(\w+)', section, re.S)
    assert row and float(row.group(1)) == pytest.approx(by_item["image.mean"].psi, abs=5e-4) and row.group(2) == "drift"

    print(f"\nPSI control (unshifted {WINDOW} patients vs reference of {N_REFERENCE}): "
          + ", ".join(f"{k} {v:.3f}" for k, v in control_psi.items()))
    print(f"PSI shifted window: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(gauge.items())))
    print(f"alert ModelInputDrift fires for: {', '.join(firing)}; test took {time.monotonic() - started:.1f} s")
    shutil.rmtree(tmp_path / "var", ignore_errors=True)


def test_model_reference_command_writes_the_reference_into_the_card(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicom_fusion.inference.card.model import load_card
    from dicom_fusion.service.cli import app

    card = init_model(tmp_path / "model", seed=0)
    generate_cohort(6, tmp_path / "cohort", seed=3, progress=False)
    res = CliRunner().invoke(app, ["model", "reference", str(card.path), "--cohort", str(tmp_path / "cohort"),
                                   "--window", "50", "--bins", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "drift reference of" in res.output and "from cohort (6 patients)" in res.output
    written = load_card(card.path)
    assert written.drift is not None and written.drift.window == 50 and written.drift.source == "cohort (6 patients)"
    assert {"image.mean", "image.std", "probability", "coverage.glucose"} <= set(written.drift.items)
    assert dataclasses.replace(written, drift=None) == card  # nothing else of the card changed
    missing = CliRunner().invoke(app, ["model", "reference", str(card.path), "--cohort", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "cohort.csv" in missing.output


def test_psi_is_exported_only_once_the_window_is_full(tmp_path: Path) -> None:
    """Before `window` jobs of the model were observed, the dashboard says it is collecting and /metrics holds
    the count only: PSI on a handful of studies is noise. Cards without a reference are not listed."""
    from opshelpers import add_study, complete

    from dicom_fusion.inference.card.drift import build_reference
    from dicom_fusion.inference.card.model import default_card, sha256_file

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"bytes")
    card = default_card(weights=weights, sha256=sha256_file(weights), path=tmp_path / "card.toml")
    settings = load_settings(data_dir=tmp_path / "var", model={"card": card.path}, api={"token": TOKEN})
    write_card(card, card.path)  # no [drift] table yet
    ledger = Ledger(settings.ledger_url)
    assert model_drift(ledger, settings) == []
    reference = build_reference({"image.mean": [float(v) for v in range(100)]}, bins=4, window=5)
    write_card(dataclasses.replace(card, drift=reference), card.path)
    client = TestClient(create_app(settings))
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def observe(uid: str, mean: float) -> None:
        add_study(ledger, uid)
        assert ledger.record_drift(complete(ledger, uid), model_name=card.name, model_version=card.version,
                                      items={"image.mean": mean})

    def samples() -> dict[str, float]:
        text = client.get("/metrics", headers=auth).text
        return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name.startswith("dicom_fusion_model_drift")}

    for i in range(4):
        observe(f"9.{i}", 500.0)  # far beyond the reference
    [drift] = model_drift(ledger, settings)
    assert (drift.observations, drift.full) == (4, False) and drift.items[0].psi > DRIFT
    assert samples() == {"dicom_fusion_model_drift_observations": 4.0}
    frag = client.get("/dashboard/fragments/overview", headers=auth).text
    assert "collecting: 4 of 5 jobs" in frag and "badge drift-drift" not in frag
    observe("9.4", 500.0)
    got = samples()
    assert got["dicom_fusion_model_drift_observations"] == 5.0 and got["dicom_fusion_model_drift_psi"] > DRIFT
    assert "badge drift-drift" in client.get("/dashboard/fragments/overview", headers=auth).text
    for i, mean in enumerate((10.0, 35.0, 60.0, 85.0, 95.0)):  # the window moves on: the newest five are
        observe(f"9.{5 + i}", mean)                             # spread over the reference again
    assert samples()["dicom_fusion_model_drift_psi"] < DRIFT
