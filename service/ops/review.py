"""Clinical review before release (README "Review"): the worklist of results awaiting review, and the
approve / reject actions, used by the CLI (and the API / dashboard) alike.

An action checks what the reviewer saw against the ledger (the job still awaits review, the model that
produced it, the class chosen is one of that model's classes), records the decision exactly once
(:meth:`Ledger.decide_review`, one conditional UPDATE) and then enqueues the deliver stage, which sends
the verified SR and the final report (approve) or retracts a preliminary report (reject). Refusals raise
:class:`ActionRefusedError` / :class:`StudyNotFoundError` with a message that says what to do.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import ActionRefusedError, StudyNotFoundError
from dicom_fusion.service.ops.operations import Enqueue
from dicom_fusion.service.outputs.concepts import INDETERMINATE_NAME
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.spool import Spool
from dicom_fusion.service.storage.models import Job, JobState, Review, ReviewVerdict, Stage, Study, utcnow

MAX_COMMENT = 4000


@dataclass(frozen=True)
class ReviewItem:
    """One result awaiting review, as the worklist shows it (UIDs and the model's output; no patient data)."""

    job_id: int
    study_uid: str
    job_version: int
    route: str
    model: str
    finding: str | None
    probability: float | None
    image_only: bool | None
    awaiting_seconds: float
    overdue: bool  # waiting longer than release.review_timeout_hours
    priority: str = "normal"  # the route's priority: urgent results are listed first

    @property
    def indeterminate(self) -> bool:
        """The model decided no class (calibrated probability in its indeterminate band): listed first."""
        return self.finding == INDETERMINATE_NAME


@dataclass(frozen=True)
class ReviewResult:
    job_id: int
    study_uid: str
    verdict: str
    message: str


_URGENCY = {"urgent": 0, "normal": 1, "background": 2}


def worklist(ledger: Ledger, settings: Settings, *, now: datetime | None = None) -> list[ReviewItem]:
    """Results awaiting review: indeterminate findings first (the model left the decision to the reviewer),
    then most urgent (the route's priority), then oldest; `overdue` past `release.review_timeout_hours`."""
    now = now or utcnow()
    limit = timedelta(hours=settings.release.review_timeout_hours)
    with ledger.session() as s:
        rows = s.execute(select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)
                         .where(Job.state == JobState.AWAITING_REVIEW)
                         .order_by(Job.awaiting_since, Job.id)).all()
    items = []
    for job, study_uid in rows:
        waited = now - (job.awaiting_since or job.updated_at)
        items.append(ReviewItem(job.id, study_uid, job.version, job.route, job.model, job.finding, job.probability,
                                job.image_only, max(waited.total_seconds(), 0.0), waited > limit,
                                job.priority or "normal"))
    return sorted(items, key=lambda i: (not i.indeterminate, _URGENCY.get(i.priority, 1), -i.awaiting_seconds))


def model_classes(settings: Settings, job_id: int) -> list[str]:
    """The class names of the model that produced the job's result (from its `result.json`), the only
    findings a reviewer may choose."""
    path = Spool(settings.spool_dir, fsync=False).job_dir(job_id) / "result.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ActionRefusedError(f"job {job_id} has no readable result ({path.name}); replay the study") from exc
    return [str(p["name"]) for p in data.get("probabilities", [])]


def _job(ledger: Ledger, job_id: int) -> tuple[Job, str]:
    with ledger.session() as s:
        row = s.execute(select(Job, Study.study_uid).join(Study, Study.id == Job.study_id)
                        .where(Job.id == job_id)).first()
    if row is None:
        raise StudyNotFoundError(f"no job {job_id} in the ledger; list the worklist with `dicom-fusion review list`")
    return row[0], row[1]


def decide(ledger: Ledger, settings: Settings, enqueue: Enqueue, job_id: int, *, verdict: ReviewVerdict,
           reviewer: str, comment: str = "", finding: str | None = None,
           expected_model: str | None = None, organization: str = "") -> ReviewResult:
    """Approve or reject the result of ``job_id`` as ``reviewer``.

    ``finding`` (approve only) is the class the reviewer chose when it differs from the model's;
    ``expected_model`` ("name version", what the reviewer was shown) refuses the action when the job's
    result comes from another model. Exactly one decision is recorded per job, however many arrive.
    """
    reviewer = " ".join(reviewer.split())
    if not reviewer:
        raise ActionRefusedError("a review needs the reviewer's name")
    if len(comment) > MAX_COMMENT:
        raise ActionRefusedError(f"the comment has {len(comment)} characters; at most {MAX_COMMENT}")
    job, study_uid = _job(ledger, job_id)
    if job.state != JobState.AWAITING_REVIEW:
        done = f" ({job.review} by {job.reviewer})" if job.review else ""
        raise ActionRefusedError(f"job {job_id} is {job.state}{done}, not awaiting review; nothing was changed")
    if expected_model is not None and expected_model != job.model:
        raise ActionRefusedError(f"job {job_id}'s result comes from {job.model or 'the default model'}, not "
                                 f"{expected_model}; reload the worklist and review the result shown there")
    if finding is not None and verdict == ReviewVerdict.REJECTED:
        raise ActionRefusedError("a rejection takes no finding; approve with --finding to change the class")
    if finding is not None:
        classes = model_classes(settings, job_id)
        if finding not in classes:
            raise ActionRefusedError(f"{finding!r} is not a class of {job.model or 'the model'}; choose one of "
                                     f"{', '.join(classes)}")
        if finding == job.finding:
            finding = None  # the model's own finding: kept, not changed
    review = Review(verdict=verdict, reviewer=reviewer, comment=comment.strip(), finding_code=finding, at=utcnow(),
                    organization=organization)
    outcome = ledger.decide_review(job_id, review, lease_seconds=settings.worker.queued_lease_seconds)
    if not outcome.recorded:
        earlier = f" ({outcome.earlier} meanwhile)" if outcome.earlier else ""
        raise ActionRefusedError(f"job {job_id} was decided by another reviewer{earlier}; nothing was sent twice")
    if outcome.enqueue:
        enqueue(job_id, Stage.DELIVER, False)
    if verdict == ReviewVerdict.APPROVED:
        what = f"finding changed to {finding}" if finding else f"finding {job.finding} confirmed"
        message = f"job {job_id} approved ({what}); the verified SR and the final report are being sent"
    elif outcome.enqueue:
        message = f"job {job_id} rejected; the preliminary report is being marked entered-in-error, no SR is sent"
    else:
        message = f"job {job_id} rejected; nothing was sent"
    return ReviewResult(job_id, study_uid, str(verdict), message)


# ---- the review page (authenticated clinical view: it may show study details, logs never do) -----------
@dataclass(frozen=True)
class LabSeries:
    """One timeline feature the model reads, as plotted on the review page: (days before the study, value)."""

    name: str
    unit: str
    points: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ClassRow:
    name: str
    display: str
    probability: float


@dataclass(frozen=True)
class ReviewDetail:
    """Everything the review page shows of one job's result."""

    job_id: int
    study_uid: str
    state: str
    route: str
    model: str
    accession: str
    modality: str
    study_date: str
    study_description: str
    finding: str | None
    classes: tuple[ClassRow, ...]
    image_only_reason: str | None
    drivers: tuple[str, ...]
    lesion: str | None
    has_overlay: bool
    card: dict[str, str]
    labs: tuple[LabSeries, ...]
    awaiting_seconds: float
    overdue: bool
    reviewer: str | None
    review: str | None
    priority: str = "normal"


_MAX_TIMELINE_BYTES = 50_000_000  # a bigger timeline.json is not parsed for the plot (the page stays fast)


def _json(path: Any) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _card_summary(settings: Settings, card_path: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Name, version, modalities and cross-validated figures of the job's model card, and its features
    (read as TOML: the ops area does not load the model library)."""
    import tomllib
    from pathlib import Path

    path = Path(card_path) if card_path else settings.model_card_path()
    try:
        card = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {"name": "?", "version": "?"}, []
    metrics = card.get("metrics") or {}
    summary = {"name": str(card.get("name", "?")), "version": str(card.get("version", "?")),
               "modalities": ", ".join(card.get("input", {}).get("modalities", [])) or "any",
               "intended_use": str(card.get("intended_use") or "not stated in the model card")}
    if "cv_roc_auc_mean" in metrics:
        summary["validation"] = (f"ROC-AUC {metrics['cv_roc_auc_mean']:.3f} ± {metrics.get('cv_roc_auc_sd', 0):.3f}, "
                                 f"ECE {metrics.get('cv_ece_mean', float('nan')):.3f} "
                                 f"({int(metrics.get('cv_folds', 0))}-fold CV, {int(metrics.get('n_patients', 0))} "
                                 "patients)")
    calibration = card.get("calibration") or {}
    if calibration:
        band = calibration.get("indeterminate")
        summary["calibration"] = (f"{calibration.get('method', 'identity')}; threshold {card.get('threshold', 0.5)}"
                                  + (f"; indeterminate band [{band[0]}, {band[1]}]" if band else "")
                                  + (f"; ECE {metrics['oof_ece_before']:.3f} → {metrics['oof_ece_after']:.3f}"
                                     if "oof_ece_after" in metrics and "oof_ece_before" in metrics else ""))
    return summary, list(card.get("timeline", {}).get("features", []))


def _labs(job_dir: Any, study_time: str, features: list[dict[str, Any]]) -> tuple[LabSeries, ...]:
    path = job_dir / "timeline.json"
    try:
        if path.stat().st_size > _MAX_TIMELINE_BYTES:
            return ()
    except OSError:
        return ()
    record = _json(path)
    events = (record.get("timeline") or {}).get("events") or []
    try:
        when = datetime.fromisoformat(study_time)
    except ValueError:
        return ()
    out = []
    for f in features:
        if f.get("kind") != "observation":
            continue
        points = []
        for e in events:
            if e.get("code") == f.get("code") and e.get("system") == f.get("system") and e.get("value") is not None:
                try:
                    days = (when - datetime.fromisoformat(str(e["time"]))).total_seconds() / 86400.0
                    points.append((round(days, 1), float(e["value"])))
                except (ValueError, TypeError):
                    continue
        if points:
            out.append(LabSeries(str(f.get("name")), str(f.get("unit") or ""), tuple(sorted(points, reverse=True))))
    return tuple(out)


def review_detail(ledger: Ledger, settings: Settings, job_id: int, *, now: datetime | None = None) -> ReviewDetail:
    """The review page of one job (any state: a decided one shows its decision)."""
    from pydicom import dcmread

    job, study_uid = _job(ledger, job_id)
    d = Spool(settings.spool_dir, fsync=False).job_dir(job_id)
    result, facts = _json(d / "result.json"), _json(d / "study.json")
    header: Any = {}
    files = ledger.study_files(job.study_id, json.loads(job.series_uids) if job.series_uids else ())
    if files:
        try:
            header = dcmread(files[0], stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - a page must render even when a file went missing
            header = {}
    card, features = _card_summary(settings, job.card_path)
    lesion = _json(d / "lesion.json")
    lesion_text = None
    if lesion.get("status") == "segmented":
        unit = "mm²" if lesion.get("kind") == "area" else "mm³"
        lesion_text = f"lesion segmented: {float(lesion.get('value', 0)):.0f} {unit} (DICOM SEG sent with the SR)"
    drivers = tuple(f"{x.get('name')} {float(x.get('attribution', 0)):+.3f}" for x in result.get("drivers", []))
    limit = timedelta(hours=settings.release.review_timeout_hours)
    waited = (now or utcnow()) - (job.awaiting_since or job.updated_at)
    date = str(header.get("StudyDate", "") or "")
    return ReviewDetail(
        job_id=job.id, study_uid=study_uid, state=job.state, route=job.route, model=job.model,
        accession=str(facts.get("accession_number", "") or header.get("AccessionNumber", "") or ""),
        modality=str(header.get("Modality", "") or ""),
        study_date=f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date,
        study_description=str(header.get("StudyDescription", "") or ""),
        finding=job.finding,
        classes=tuple(ClassRow(str(p["name"]), str(p.get("display", p["name"])), float(p["probability"]))
                      for p in result.get("probabilities", [])),
        image_only_reason=result.get("image_only_reason") if result.get("image_only") else None,
        drivers=drivers, lesion=lesion_text, has_overlay=(d / "saliency.png").exists(), card=card,
        labs=_labs(d, str(facts.get("study_time", "")), features),
        awaiting_seconds=max(waited.total_seconds(), 0.0), overdue=job.state == JobState.AWAITING_REVIEW and waited > limit,
        reviewer=job.reviewer, review=job.review, priority=job.priority or "normal")


def overlay_path(settings: Settings, job_id: int) -> Any:
    """The Grad-CAM overlay PNG of the job (the image the model read), if there is one."""
    path = Spool(settings.spool_dir, fsync=False).job_dir(job_id) / "saliency.png"
    return path if path.exists() else None
