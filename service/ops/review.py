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


@dataclass(frozen=True)
class ReviewResult:
    job_id: int
    study_uid: str
    verdict: str
    message: str


def worklist(ledger: Ledger, settings: Settings, *, now: datetime | None = None) -> list[ReviewItem]:
    """Results awaiting review, oldest first; `overdue` past `release.review_timeout_hours`."""
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
                                job.image_only, max(waited.total_seconds(), 0.0), waited > limit))
    return items


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
