"""Operator actions on studies: retry, replay, dead-letter re-delivery.

One function per action, used by the REST API, the dashboard and the CLI alike. Each checks the
study's state in the ledger, changes it there (with an audit row) and then enqueues the stage to
run, so a broker that loses the message is covered by the lease reaper like any other job.
Refusals raise :class:`ActionRefusedError` with a message that says what to do instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import ActionRefusedError, StudyNotFoundError
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Job, JobState, RouteStudy, Stage, Study, StudyState

#: Publishes a job's stage to the broker (``requeue`` marks an operator/reaper re-enqueue).
Enqueue = Callable[[int, Stage, bool], None]


@dataclass(frozen=True)
class ActionResult:
    action: str  # "retry" | "replay" | "redeliver"
    study_uid: str
    job_version: int
    stage: str
    message: str


def make_enqueue(ledger: Ledger, settings: Settings) -> Enqueue:
    """An :data:`Enqueue` that publishes through a Celery app built from ``settings``."""
    from dicom_fusion.service.jobs.queues import enqueue, make_celery

    app = make_celery(settings)

    def _enqueue(job_id: int, stage: Stage, requeue: bool) -> None:
        enqueue(app, ledger, settings, job_id, stage, requeue=requeue)

    return _enqueue


def make_router(ledger: Ledger, settings: Settings) -> RouteStudy:
    """The routing of ``settings`` (a replay is routed again, with the routes in force now); raises
    :class:`~dicom_fusion.service.routing.routes.RouteError` when the route table is invalid."""
    from dicom_fusion.service.routing.router import Router

    return Router.from_settings(settings, ledger, rerun=True)


def _study_and_latest_job(ledger: Ledger, study_uid: str) -> tuple[Study, Job | None]:
    with ledger.session() as s:
        study = s.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise StudyNotFoundError(f"no study {study_uid} in the ledger; check the Study Instance UID")
        job = s.scalar(select(Job).where(Job.study_id == study.id).order_by(Job.version.desc()).limit(1))
        return study, job


def retry_study(ledger: Ledger, enqueue: Enqueue, study_uid: str, *, actor: str = "console") -> ActionResult:
    """Run the current stage of the study's failed or dead job again: now for a failed (backing-off) job,
    with a fresh retry budget for a dead one. With several jobs from its latest completion (routes with
    `continue`), the first failed or dead one (`retry` again for the next)."""
    _, job = _study_and_latest_job(ledger, study_uid)
    if job is None:
        raise ActionRefusedError(f"study {study_uid} has no job yet: it is still receiving and starts "
                                 "after the quiet period")
    job = next((j for j in ledger.current_jobs(study_uid) if j.state in (JobState.DEAD, JobState.FAILED)), job)
    stage = Stage(job.stage)
    if job.state == JobState.DEAD:
        if not ledger.reset_for_redelivery(job.id):
            raise ActionRefusedError(f"job v{job.version} of {study_uid} changed state meanwhile; reload")
        ledger.record_action(job.id, "retry", actor=actor)
        enqueue(job.id, stage, True)
        return ActionResult("retry", study_uid, job.version, str(stage),
                            f"dead job v{job.version} re-enqueued at stage {stage} with a fresh retry budget")
    if job.state == JobState.FAILED:
        ledger.record_action(job.id, "retry", actor=actor)
        enqueue(job.id, stage, True)
        return ActionResult("retry", study_uid, job.version, str(stage),
                            f"failed job v{job.version} re-enqueued at stage {stage} now")
    hint = ("; use replay to run the study again" if job.state in (JobState.DONE, JobState.IGNORED)
            else "; it is still in progress")
    raise ActionRefusedError(f"job v{job.version} of {study_uid} is {job.state}: retry applies to failed "
                             f"or dead jobs{hint}")


def replay_study(ledger: Ledger, enqueue: Enqueue, study_uid: str, route: RouteStudy | None = None, *,
                 actor: str = "console") -> ActionResult:
    """Start new job versions over the stored instances (new SR and report each, derived from the version),
    routed again by ``route``: one per matching route, so a study ignored before may match a route added
    since, and the other way round. ``job_version`` of the result is the first new version."""
    study, _ = _study_and_latest_job(ledger, study_uid)
    if study.state == StudyState.RECEIVING:
        raise ActionRefusedError(f"study {study_uid} is still receiving instances; it gets a new job "
                                 "version by itself after the quiet period")
    for job in ledger.current_jobs(study_uid):
        if job.state not in (JobState.DONE, JobState.DEAD, JobState.IGNORED):
            raise ActionRefusedError(f"job v{job.version} of {study_uid} is {job.state}; wait for it to finish "
                                     "(or retry it if it failed) before replaying")
    job_ids = ledger.add_job_version(study_uid, reason="operator replay", route=route)
    if job_ids is None:
        raise ActionRefusedError(f"study {study_uid} changed state meanwhile; reload and try again")
    with ledger.session() as s:
        new = [j for j in (s.get(Job, i) for i in job_ids) if j is not None]
    for j in new:
        ledger.record_action(j.id, "replay", actor=actor)
    if len(new) == 1 and new[0].state == JobState.IGNORED:
        return ActionResult("replay", study_uid, new[0].version, "", f"job v{new[0].version} ignored: {new[0].error}")
    for j in new:
        enqueue(j.id, Stage.PREPARE, False)
    names = f"job v{new[0].version}" if len(new) == 1 else \
        "jobs " + ", ".join(f"v{j.version} (route {j.route})" for j in new)  # one per route
    return ActionResult("replay", study_uid, new[0].version, str(Stage.PREPARE),
                        f"{names} created from {study.instance_count} stored instance(s) and queued")


def _redeliver(ledger: Ledger, enqueue: Enqueue, job: Job, study_uid: str, actor: str) -> ActionResult | None:
    """Reset one dead job (None if it changed state meanwhile) and enqueue it at the stage it died at."""
    if not ledger.reset_for_redelivery(job.id):
        return None
    ledger.record_action(job.id, "redeliver", actor=actor)
    enqueue(job.id, Stage(job.stage), True)
    return ActionResult("redeliver", study_uid, job.version, str(job.stage),
                        f"dead job {job.id} (v{job.version}) re-enqueued at stage {job.stage}")


def redeliver_job(ledger: Ledger, enqueue: Enqueue, job_id: int, *, actor: str = "console") -> ActionResult:
    """Dead-letter re-delivery of one job by id (`dicom-fusion redeliver JOB_ID`)."""
    job = ledger.job(job_id)
    if job is None:
        raise StudyNotFoundError(f"no job {job_id} in the ledger; take a job id from `dicom-fusion status`")
    if job.state != JobState.DEAD:
        raise ActionRefusedError(f"job {job_id} (v{job.version}) is {job.state}; only dead jobs are re-delivered")
    with ledger.session() as s:
        uid = s.scalar(select(Study.study_uid).where(Study.id == job.study_id)) or ""
    result = _redeliver(ledger, enqueue, job, uid, actor)
    if result is None:
        raise ActionRefusedError(f"job {job_id} changed state meanwhile; run the command again")
    return result


def redeliver_dead(ledger: Ledger, enqueue: Enqueue, *, study_uid: str | None = None,
                   actor: str = "console") -> list[ActionResult]:
    """Dead-letter re-delivery: every dead job (or the dead job of one study) goes back to the stage
    it died at with a fresh retry budget; its dead deliveries become pending again."""
    with ledger.session() as s:
        q = select(Job, Study.study_uid).join(Study, Study.id == Job.study_id).where(Job.state == JobState.DEAD)
        if study_uid is not None:
            if s.scalar(select(Study.id).where(Study.study_uid == study_uid)) is None:
                raise StudyNotFoundError(f"no study {study_uid} in the ledger; check the Study Instance UID")
            q = q.where(Study.study_uid == study_uid)
        dead = s.execute(q.order_by(Job.id)).all()
    results = [r for job, uid in dead if (r := _redeliver(ledger, enqueue, job, uid, actor)) is not None]
    if study_uid is not None and not results:
        raise ActionRefusedError(f"study {study_uid} has no dead job to re-deliver")
    return results
