"""Review before release on a real SQLite ledger and the real embedded broker: the job parks in
`awaiting_review`, exactly one decision is recorded however many arrive, bad decisions are refused with a
message, and the outputs (SR, report, ORU) say whether a clinician verified the result."""
from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opshelpers import OWNER, add_study, advance_to, complete
from test_operations import enqueue, ledger, messages, settings  # noqa: F401 - the same real-ledger fixtures

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.errors import ActionRefusedError, StudyNotFoundError
from dicom_fusion.service.ops import operations, review
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DeliveryKind, JobState, Review, ReviewVerdict, Stage, utcnow
from dicom_fusion.service.storage.spool import Spool

CLASSES = [{"name": "benign", "code": "1", "system": "http://snomed.info/sct", "display": "Benign",
            "probability": 0.3},
           {"name": "malignant", "code": "2", "system": "http://snomed.info/sct", "display": "Malignant",
            "probability": 0.7}]


def awaiting(ledger: Ledger, settings: Settings, uid: str, *, preliminary: bool = False) -> int:
    """A job of study `uid` through inference and the first deliver run of review mode, parked."""
    add_study(ledger, uid)
    job = complete(ledger, uid)
    advance_to(ledger, job, Stage.DELIVER)
    assert ledger.claim(job, stage=Stage.DELIVER, owner=OWNER, lease_seconds=60) is not None
    ledger.set_result(job, finding="malignant", probability=0.7, image_only=False, sr_uid=f"2.25.{job}")
    (Spool(settings.spool_dir, fsync=False).job_dir(job) / "result.json").write_text(
        json.dumps({"model_name": "m", "model_version": "1", "probabilities": CLASSES}))
    if preliminary:
        ledger.ensure_deliveries(job, targets={DeliveryKind.PRELIMINARY: "http://fhir"})
        ledger.delivery_result(job, DeliveryKind.PRELIMINARY, ok=True, remote_id="DiagnosticReport/1")
    assert ledger.await_review(job, owner=OWNER)
    return job


def test_a_parked_job_holds_no_lease_and_the_reaper_leaves_it(ledger: Ledger, settings: Settings) -> None:
    job = awaiting(ledger, settings, "1.1")
    row = ledger.job(job)
    assert row is not None and row.state == JobState.AWAITING_REVIEW and row.stage == Stage.REVIEW
    assert row.lease_owner is None and row.awaiting_since is not None
    assert job not in [j for j, _ in ledger.expired_jobs()]
    assert ledger.claim(job, stage=Stage.DELIVER, owner="other", lease_seconds=60) is None
    [item] = review.worklist(ledger, settings)
    assert (item.job_id, item.study_uid, item.finding, item.overdue) == (job, "1.1", "malignant", False)


def test_approve_records_once_and_enqueues_deliver(ledger: Ledger, settings: Settings,
                                                   enqueue: operations.Enqueue) -> None:
    job = awaiting(ledger, settings, "1.2")
    result = review.decide(ledger, settings, enqueue, job, verdict=ReviewVerdict.APPROVED, reviewer="Jane  Smith",
                           comment="agree", finding="benign")
    assert "finding changed to benign" in result.message
    row = ledger.job(job)
    assert row is not None and (row.state, row.stage, row.review, row.reviewer, row.reviewed_finding) == (
        JobState.QUEUED, Stage.DELIVER, "approved", "Jane Smith", "benign")
    assert [m[1] for m in messages(settings)] == ["dicom_fusion.deliver"]
    audit = [e.event for e in ledger.audit_events("job", job)]
    assert "review_approved" in audit
    assert not any("agree" in e.detail for e in ledger.audit_events("job", job))  # comments stay out of audit
    with pytest.raises(ActionRefusedError, match="not awaiting review"):
        review.decide(ledger, settings, enqueue, job, verdict=ReviewVerdict.REJECTED, reviewer="Other")
    assert len(messages(settings)) == 1


def test_reject_without_preliminary_ends_the_job_and_sends_nothing(ledger: Ledger, settings: Settings,
                                                                   enqueue: operations.Enqueue) -> None:
    job = awaiting(ledger, settings, "1.3")
    result = review.decide(ledger, settings, enqueue, job, verdict=ReviewVerdict.REJECTED, reviewer="J S")
    assert result.message.endswith("nothing was sent")
    row = ledger.job(job)
    assert row is not None and row.state == JobState.REJECTED and row.finished_at is not None
    assert messages(settings) == []


def test_reject_after_a_preliminary_report_goes_back_to_deliver(ledger: Ledger, settings: Settings,
                                                                enqueue: operations.Enqueue) -> None:
    job = awaiting(ledger, settings, "1.4", preliminary=True)
    review.decide(ledger, settings, enqueue, job, verdict=ReviewVerdict.REJECTED, reviewer="J S", comment="artefact")
    row = ledger.job(job)
    assert row is not None and (row.state, row.stage) == (JobState.QUEUED, Stage.DELIVER)
    ref = ledger.claim(job, stage=Stage.DELIVER, owner=OWNER, lease_seconds=60)
    assert ref is not None and ref.review is not None and ref.review.verdict == ReviewVerdict.REJECTED
    assert ref.review.comment == "artefact"
    assert ledger.finish(job, owner=OWNER) == JobState.REJECTED


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"reviewer": " "}, "reviewer's name"),
    ({"reviewer": "A", "finding": "cyst"}, "not a class of"),
    ({"reviewer": "A", "expected_model": "other 2"}, "reload the worklist"),
    ({"reviewer": "A", "comment": "x" * 4001}, "at most 4000"),
])
def test_bad_decisions_are_refused_and_change_nothing(ledger: Ledger, settings: Settings,
                                                      enqueue: operations.Enqueue, kwargs: dict[str, str],
                                                      message: str) -> None:
    job = awaiting(ledger, settings, "1.5")
    with pytest.raises(ActionRefusedError, match=message):
        review.decide(ledger, settings, enqueue, job, verdict=ReviewVerdict.APPROVED, **kwargs)  # type: ignore[arg-type]
    row = ledger.job(job)
    assert row is not None and row.state == JobState.AWAITING_REVIEW and row.review is None
    with pytest.raises(StudyNotFoundError):
        review.decide(ledger, settings, enqueue, 999, verdict=ReviewVerdict.APPROVED, reviewer="A")


def test_concurrent_approvals_record_one_decision(ledger: Ledger, settings: Settings,
                                                  enqueue: operations.Enqueue) -> None:
    job = awaiting(ledger, settings, "1.6")
    outcomes: list[bool] = []
    barrier = threading.Barrier(4)

    def approve(name: str) -> None:
        barrier.wait()
        outcomes.append(ledger.decide_review(job, Review(ReviewVerdict.APPROVED, name, "", None, utcnow()),
                                             lease_seconds=60).recorded)

    threads = [threading.Thread(target=approve, args=(f"R{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == [False, False, False, True]
    assert [e.event for e in ledger.audit_events("job", job)].count("review_approved") == 1


def test_review_mode_comes_from_the_route_or_the_global_default(tmp_path: Path) -> None:
    from dicom_fusion.service.routing.routes import RouteError, load_routes

    base = {"data_dir": tmp_path / "var"}
    table = load_routes(load_settings(**base, routes=[{"name": "dx", "release": "review"}, {"name": "all"}]))
    assert [r.release for r in table.routes] == ["review", None]
    with pytest.raises(RouteError, match="release: 'later' is unknown"):
        load_routes(load_settings(**base, routes=[{"name": "dx", "release": "later"}]))


# ---- outputs -------------------------------------------------------------------------------------------
def _result(finding: str = "malignant"):  # type: ignore[no-untyped-def]
    from dicom_fusion.inference.serve.predict import ClassProbability, InferenceResult

    probs = tuple(ClassProbability(**{k: v for k, v in c.items()}) for c in CLASSES)  # type: ignore[arg-type]
    return InferenceResult("m", "1", probs, next(p for p in probs if p.name == finding), False, None)


def test_sr_is_unverified_until_approved_then_names_the_reviewer(tmp_path: Path) -> None:
    from conftest import write_instance
    from pydicom import dcmread

    from dicom_fusion.service.jobs.study_context import reviewed_result, verification
    from dicom_fusion.service.outputs.sr.build import build_sr, read_sr

    src = dcmread(write_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.1", sop_uid="1.2.3.1.1",
                                 rows=8), stop_before_pixels=True)
    when = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    plain = build_sr([src], _result(), sr_instance_uid="1.2.9.1", sr_series_uid="1.2.9", content_datetime=when)
    assert (plain.CompletionFlag, plain.VerificationFlag, plain.PreliminaryFlag) == (
        "COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert not read_sr(plain).verified

    decision = Review(ReviewVerdict.APPROVED, "Jane Q Smith", "lesion confirmed on prior", "benign",
                      datetime(2026, 12, 2, 11, 30))
    shown, model_finding = reviewed_result(_result(), decision)
    assert shown.finding.name == "benign" and model_finding.name == "malignant"
    sr = build_sr([src], shown, sr_instance_uid="1.2.9.1", sr_series_uid="1.2.9", content_datetime=when,
                  verification=verification(decision, model_finding, "General Hospital"))
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("VERIFIED", "FINAL")
    observer = sr.VerifyingObserverSequence[0]
    assert (str(observer.VerifyingObserverName), observer.VerifyingOrganization) == ("Smith^Jane Q", "General Hospital")
    local = datetime(2026, 12, 2, 11, 30, tzinfo=UTC).astimezone().replace(tzinfo=None)
    assert str(observer.VerificationDateTime) == local.strftime("%Y%m%d%H%M%S")
    reading = read_sr(sr)
    assert reading.verified and reading.reviewer == "Smith^Jane Q" and reading.finding.code == "1"
    assert reading.review == ("Clinical review: changed the finding to Benign; the model's output was Malignant "
                              "(probability 0.70)", "Reviewer comment: lesion confirmed on prior")
    assert [c.probability for c in reading.probabilities] == [0.3, 0.7]  # the model's numbers, unchanged


def test_report_and_oru_carry_the_release_status() -> None:
    from dicom_fusion.fhir.hl7v2 import Hl7Header, build_oru
    from dicom_fusion.fhir.report import build_report_bundle
    from dicom_fusion.service.jobs.study_context import StudyFacts, report_content, verification

    facts = StudyFacts("1.2.3", "2026-12-01T10:00:00+00:00", "P1", "", "ACC1")
    prelim = report_content(_result(), facts, sr_uid="1.2.9.1", patient_id=None, system="urn:x", status="preliminary")
    bundle = build_report_bundle(prelim)
    report = bundle["entry"][-1]["resource"]
    assert report["status"] == "preliminary" and "not reviewed by a clinician" in report["conclusion"]
    assert {e["resource"]["status"] for e in bundle["entry"]} == {"preliminary"}
    assert "resultsInterpreter" not in report
    header = Hl7Header("A", "B", "C", "D")
    oru = build_oru(prelim, header).split("\r")
    assert oru[2].split("|")[25] == "P" and all(s.split("|")[11] == "P" for s in oru if s.startswith("OBX"))

    decision = Review(ReviewVerdict.APPROVED, "Jane Smith", "", None, datetime(2026, 12, 2, 11, 30))
    final = report_content(_result(), facts, sr_uid="1.2.9.1", patient_id=None, system="urn:x", status="final",
                           verified=verification(decision, None, "GH"))
    report = build_report_bundle(final)["entry"][-1]["resource"]
    assert report["status"] == "final" and report["resultsInterpreter"] == [{"display": "Jane Smith"}]
    assert "Clinical review: confirmed the model's finding Malignant" in report["conclusion"]
    oru = build_oru(final, header).split("\r")
    assert oru[2].split("|")[25] == "F" and all(s.split("|")[11] == "F" for s in oru if s.startswith("OBX"))


def test_metrics_count_overdue_reviews(ledger: Ledger, settings: Settings) -> None:
    from datetime import timedelta

    from sqlalchemy import update
    from test_metrics import scrape

    from dicom_fusion.service.storage.models import Job

    old, new = awaiting(ledger, settings, "1.7"), awaiting(ledger, settings, "1.8")
    with ledger.transaction() as s:  # one waited 30 h (over the 24 h default), one 2 h
        for job, hours in ((old, 30), (new, 2)):
            s.execute(update(Job).where(Job.id == job).values(awaiting_since=utcnow() - timedelta(hours=hours)))
    m = scrape(ledger, settings)
    assert m[("dicom_fusion_awaiting_review_overdue", ())] == 1
    assert m[("dicom_fusion_awaiting_review_oldest_seconds", ())] == pytest.approx(30 * 3600, abs=60)
    assert m[("dicom_fusion_jobs", (("state", "awaiting_review"),))] == 2
    assert [i.overdue for i in review.worklist(ledger, settings)] == [True, False]


def test_the_lesion_outline_is_drawn_on_the_source_grid(tmp_path: Path) -> None:
    """The review page's lesion image: the SEG's outline over the source pixels, nothing inside it drawn."""
    import io

    import numpy as np
    import pydicom
    from PIL import Image

    from dicom_fusion.inference.synth.generate import generate_patient
    from dicom_fusion.service.ops.lesion_view import OUTLINE, lesion_png
    from dicom_fusion.service.outputs.seg.build import SegmentCodes, build_segmentation

    p = generate_patient(1, tmp_path / "study", seed=3, modality="DX")
    [source] = sorted(p.study_dir.glob("*.dcm"))
    ds = pydicom.dcmread(source)
    mask = np.zeros((int(ds.Rows), int(ds.Columns)), np.uint8)
    mask[20:40, 30:50] = 1
    seg = build_segmentation([ds], mask, sr_instance_uid="1.2.826.0.1.3680043.8.498.1", model_name="m",
                             model_version="1", content_datetime=datetime(2026, 1, 1),
                             segment=SegmentCodes("Lesion", "52988006", "Lesion", "49755003", "Abnormal"))
    job = tmp_path / "job"
    job.mkdir()
    seg.save_as(job / "seg.dcm", enforce_file_format=True)
    assert lesion_png(job) is None  # no prepared.json: the sources are unknown
    (job / "prepared.json").write_text(json.dumps({"source_files": [str(source)]}))
    img = np.asarray(Image.open(io.BytesIO(lesion_png(job) or b"")))
    red = np.all(img == OUTLINE, axis=-1)
    assert red.shape == mask.shape and red[20, 35] and red[39, 35] and red[30, 30] and red[30, 49]
    assert not red[30, 40] and not red[10, 10] and red.sum() == 2 * 20 + 2 * 18


def test_the_worklist_lists_urgent_results_first_then_the_oldest(ledger: Ledger, settings: Settings) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from dicom_fusion.service.storage.models import Job

    old, urgent, new = (awaiting(ledger, settings, uid) for uid in ("2.1", "2.2", "2.3"))
    with ledger.transaction() as s:
        for job, hours, priority in ((old, 5, "normal"), (urgent, 1, "urgent"), (new, 2, "normal")):
            s.execute(update(Job).where(Job.id == job).values(awaiting_since=utcnow() - timedelta(hours=hours),
                                                               priority=priority))
    assert [i.job_id for i in review.worklist(ledger, settings)] == [urgent, old, new]
