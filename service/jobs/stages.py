"""Stage bodies of a job: prepare → timeline → infer → deliver.

Each body reads its inputs from, and writes its outputs to, the job's folder in the spool (files
replaced atomically), so any stage can be re-run after a crash and produce the same result. Bodies
raise :class:`PermanentError` when retrying cannot help and let anything else propagate to be retried.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from dicom_fusion.service.errors import PermanentError, TransientError
from dicom_fusion.service.jobs.resource_log import read_timeline_record
from dicom_fusion.service.jobs.study_context import (
    StudyFacts,
    identifier_system,
    report_content,
    reviewed_result,
    study_facts,
    verification,
)
from dicom_fusion.service.outputs.identity import derive_sr_uids, derive_verified_sr_uid
from dicom_fusion.service.outputs.sr.build import SrVerification, rejection_lines, source_header
from dicom_fusion.service.storage.models import (
    DeliveryKind,
    DeliveryState,
    JobRef,
    ReleaseMode,
    Review,
    ReviewVerdict,
    Stage,
    utcnow,
)
from dicom_fusion.service.storage.spool import write_durable

log = logging.getLogger(__name__)


def _write_json(path: Path, data: Any, fsync: bool) -> None:
    write_durable(path, json.dumps(data, indent=2, sort_keys=True).encode(), fsync=fsync, replace=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PermanentError(f"{path.name} missing in {path.parent}; replay the study") from exc


def _job_files(rt: Any, job: JobRef) -> list[Path]:
    """The spooled files the job's model reads: those of the series its route selected (all when the job
    predates routing).

    The paths are the ledger's, written by whichever listener received the instance: a worker on another
    host reads them only if `spool.dir` is the same shared folder there (README "Start each piece"). A file
    the ledger holds but this host cannot see, or one outside this host's spool, is a deployment fault,
    not a bad study: a transient error naming the file and the setting, so the job waits (retried with
    backoff) instead of running on part of the study, writing its job files where the other stages never
    look, or dying at once; it goes on once the spool is mounted (the worker restarted with it).
    """
    paths = rt.ledger.study_files(job.study_id, job.series_uids)
    root = Path(rt.spool.root).resolve()
    # outside this host's spool: the listener wrote to another spool.dir, so the files this job writes
    # (image.npy, the SR) would land where the other workers never look
    elsewhere = [p for p in paths if not (p.is_relative_to(root) or p.resolve().is_relative_to(root))]
    missing = elsewhere or [p for p in paths if not p.exists()]
    if missing:
        where = "outside this host's spool" if elsewhere else "not on this host"
        raise TransientError(
            f"{len(missing)} of the study's {len(paths)} spooled instance file(s) are {where}, e.g. "
            f"{missing[0]}: spool.dir ({rt.spool.root}) must be the spool every listener writes to (a shared "
            "folder: NFS, a ReadWriteMany volume) mounted at the same path on every host"
        )
    return paths


def prepare(rt: Any, job: JobRef) -> Stage:
    from dicom_fusion.inference.data.images import load_study_image
    from dicom_fusion.inference.errors import InferenceError

    files = _job_files(rt, job)
    if not files:
        raise PermanentError("no spooled instance files found for the study")
    try:
        prepared = load_study_image(files, rt.models(job.card_path).card)
    except InferenceError as exc:
        raise PermanentError(str(exc)) from exc
    d = rt.spool.job_dir(job.job_id)
    source_files = [str(p) for p in files]
    by_sop = {}
    for p in files:  # map the used SOP Instance UIDs back to their spool files (name starts with the UID)
        by_sop[p.name.rsplit(".", 2)[0]] = str(p)
    used = [by_sop[u] for u in prepared.sop_instance_uids if u in by_sop] or source_files[:1]
    facts = study_facts(Path(used[0]))
    buf = io.BytesIO()
    np.save(buf, prepared.array.astype(np.float32), allow_pickle=False)
    write_durable(d / "image.npy", buf.getvalue(), fsync=rt.spool.fsync, replace=True)
    _write_json(d / "prepared.json", {"series_instance_uid": prepared.series_instance_uid,
                                      "sop_instance_uids": list(prepared.sop_instance_uids),
                                      "source_files": used, "shape": list(prepared.array.shape),
                                      "intensity_mean": prepared.intensity_mean,
                                      "intensity_std": prepared.intensity_std},
                rt.spool.fsync)
    _write_json(d / "study.json", facts.to_dict(), rt.spool.fsync)
    return Stage.TIMELINE


#: Why a prediction is image-only, per timeline status; written into the SR, the report and the ORU.
IMAGE_ONLY_REASONS = {
    "no_patient": "no FHIR Patient has the study's patient identifier",
    "ambiguous_patient": "several FHIR Patients share the study's patient identifier; none was used",
    "empty": "no EHR events in the model's window",
}


#: The setting behind each limit of a timeline fetch, named in the image-only reason.
_LIMIT_SETTINGS = {"deadline": "fhir.timeline_deadline_seconds", "pages": "fhir.max_pages",
                   "resources": "fhir.max_resources", "bytes": "fhir.max_bytes"}


def timeline(rt: Any, job: JobRef) -> Stage:
    """Fetch the EHR timeline; FHIR trouble degrades to image-only once the wait budget is spent
    (``fhir.unavailable_wait_seconds`` since the job was created, or the stage's last retry).

    The fetch is bounded (``fhir.timeline_deadline_seconds``, ``fhir.max_pages|max_resources|max_bytes``):
    past a bound the prediction is image-only at once, with the bound as the reason. A server that asks us
    to come back later (Retry-After) is retried then — the job is re-scheduled, the worker never sleeps
    on it — unless it asks for more than ``fhir.retry_after_max_seconds``: then image-only too. Reasons
    and errors carry statuses, issue codes and setting names, never what the server sent.
    """
    from dicom_fusion.fhir.client import FetchLimits
    from dicom_fusion.fhir.errors import (
        AuthenticationError,
        FetchLimitExceeded,
        FHIRError,
        FHIRRetryLater,
        FHIRUnavailable,
    )
    from dicom_fusion.fhir.timeline import read_timeline
    from dicom_fusion.inference.data.timeline_tensor import read_by
    from dicom_fusion.service.jobs.resource_log import ResourceLog, write_timeline_record

    d = rt.spool.job_dir(job.job_id)
    facts = StudyFacts.from_dict(_read_json(d / "study.json"))
    fhir = rt.settings.fhir
    record: dict[str, Any]
    if not fhir.enabled:
        record = {"status": "disabled", "reason": "fhir.base_url not set"}
    elif not facts.patient_id:
        record = {"status": "no_patient", "reason": "study has no PatientID"}
    else:
        system = identifier_system(fhir, facts.issuer)
        card = rt.models(job.card_path).card
        limits = FetchLimits(deadline_seconds=fhir.timeline_deadline_seconds, max_pages=fhir.max_pages,
                             max_resources=fhir.max_resources, max_bytes=fhir.max_bytes)
        try:
            # Bounded memory (README "Reliability"): pages are read one at a time, only the events a feature
            # of the card reads are kept, and the resources behind them stream into the audit file.
            with rt.fhir_client() as client, ResourceLog(d, fsync=rt.spool.fsync) as audit:
                tl = read_timeline(
                    client, identifier_system=system, identifier_value=facts.patient_id,
                    study_time=facts.time, window_days=card.timeline.window_days,
                    resource_types=card.timeline.resource_types, target_units=card.timeline.target_units,
                    value_bounds=card.timeline.value_bounds, elements=fhir.search_elements, limits=limits,
                    keep=read_by(card.timeline), on_resource=audit.add)
                audit.commit()  # the exact resources the prediction saw, content-addressed
        except FetchLimitExceeded as exc:
            setting = _LIMIT_SETTINGS.get(exc.limit, "the fetch limits")
            log.warning("job %s: FHIR timeline fetch stopped at %s = %g; predicting image-only",
                        job.job_id, setting, exc.value)
            record = {"status": "limited", "limit": exc.limit,
                      "reason": f"FHIR timeline fetch stopped at its {exc.limit} limit "
                                f"({setting} = {exc.value:g})"}
        except (FHIRUnavailable, AuthenticationError) as exc:
            record = _unavailable(rt, job, exc, isinstance(exc, FHIRRetryLater))
        except FHIRError as exc:
            record = {"status": "error", "reason": f"FHIR error: {exc}"}
        else:
            record = {"status": tl.status, "timeline": dataclasses.replace(tl, events=()).to_dict(),
                      "resources_sha256": audit.digest, "identifier_system": system}
            if tl.status in IMAGE_ONLY_REASONS:
                record["reason"] = IMAGE_ONLY_REASONS[tl.status]
    if "timeline" in record:  # the events streamed out: bounded memory on big timelines
        write_timeline_record(d / "timeline.json", record, tl.events, fsync=rt.spool.fsync)
    else:
        _write_json(d / "timeline.json", record, rt.spool.fsync)
    return Stage.INFER


def _unavailable(rt: Any, job: JobRef, exc: Exception, retry_later: bool) -> dict[str, Any]:
    """FHIR down, refusing us, or asking us to come back later: raise `TransientError` (re-scheduled; at
    the server's Retry-After when it gave one) while the wait budget lasts, else the image-only record."""
    fhir = rt.settings.fhir
    waited = (utcnow() - job.created_at).total_seconds()
    last_try = job.attempts + 1 > rt.settings.worker.max_retries
    retry_after = float(getattr(exc, "retry_after", 0.0)) if retry_later else None
    if retry_after is not None and retry_after > fhir.retry_after_max_seconds:
        log.warning("job %s: FHIR server asked to retry in %.0f s (more than fhir.retry_after_max_seconds "
                    "= %g); predicting image-only", job.job_id, retry_after, fhir.retry_after_max_seconds)
        return {"status": "unavailable",
                "reason": f"FHIR server asked to retry in {retry_after:.0f} s, more than "
                          f"fhir.retry_after_max_seconds ({fhir.retry_after_max_seconds:g} s)"}
    if waited < fhir.unavailable_wait_seconds and not last_try:
        raise TransientError(f"FHIR unavailable: {exc}", retry_in=retry_after) from exc
    log.warning("job %s: FHIR unavailable for %.0fs, predicting image-only", job.job_id, waited)
    return {"status": "unavailable", "reason": f"FHIR unavailable: {type(exc).__name__}"}


def infer(rt: Any, job: JobRef) -> Stage:
    from dicom_fusion.fhir.timeline import Timeline
    from dicom_fusion.inference.data.timeline_tensor import encode_timeline

    d = rt.spool.job_dir(job.job_id)
    models = rt.models(job.card_path)
    try:
        image = np.load(d / "image.npy", allow_pickle=False)
    except FileNotFoundError as exc:
        raise PermanentError("image.npy missing; replay the study") from exc
    facts = StudyFacts.from_dict(_read_json(d / "study.json"))
    record = read_timeline_record(d / "timeline.json")
    tensor = None
    reason: str | None = None
    if record.get("status") == "ok":
        tl = Timeline.from_dict(record["timeline"])
        tensor = encode_timeline(tl.events, facts.time, models.card.timeline)
        if tensor is None:
            reason = "no EHR events in the model's window"
    else:
        reason = record.get("reason") or str(record.get("status"))
    import math
    import time

    from dicom_fusion.inference.errors import InferenceError
    from dicom_fusion.service.telemetry import observe_inference

    predictor = models.predictor  # loaded on first use: not part of the inference time
    started = time.perf_counter()
    try:
        result = predictor.predict(image, tensor, image_only_reason=reason)
    except InferenceError as exc:  # e.g. non-finite output: the same inputs give the same numbers
        raise PermanentError(f"the model gave no usable result: {exc}") from exc
    if not all(math.isfinite(p.probability) for p in result.probabilities):
        raise PermanentError(f"the model gave non-finite probabilities ({result.model_name} "
                             f"{result.model_version}); no finding is recorded without a probability")
    observe_inference(result.model_name, result.model_version, time.perf_counter() - started)
    _, sr_uid = derive_sr_uids(facts.study_uid, result.model_name, result.model_version, job.version)
    if rt.settings.model.explain:
        result = _explain(rt, job, d, predictor, image, tensor, result, sr_uid)
    if models.segmenter is not None:
        _segment(rt, job, d, sr_uid)
    _write_json(d / "result.json", result.to_dict(), rt.spool.fsync)
    rt.ledger.set_result(job.job_id, finding=result.finding.name, probability=result.finding.probability,
                         image_only=result.image_only, sr_uid=sr_uid)
    _record_drift(rt, job, d, models.card, tensor, result)
    return Stage.DELIVER


def _record_drift(rt: Any, job: JobRef, d: Path, card: Any, tensor: Any, result: Any) -> None:
    """The job's drift items (README "Drift"; inference/serve/drift_items.py, the function the card's reference
    was built with) into the ledger, once per job and model. A job prepared before drift monitoring has no
    intensity statistics in prepared.json and records nothing."""
    from dicom_fusion.inference.serve.drift_items import drift_items, positive_probability

    prepared = _read_json(d / "prepared.json")
    if "intensity_mean" not in prepared:
        return
    items = drift_items(card, intensity_mean=prepared["intensity_mean"], intensity_std=prepared["intensity_std"],
                        timeline=tensor, probability=positive_probability(card, result))
    rt.ledger.record_drift(job.job_id, model_name=result.model_name, model_version=result.model_version,
                           items=items)


def _explain(rt: Any, job: JobRef, d: Path, predictor: Any, image: np.ndarray, tensor: Any, result: Any,
             sr_uid: str) -> Any:
    """Grad-CAM + timeline attributions: `saliency.png` and the Secondary Capture `saliency.dcm` in the job
    folder (deliver sends the SC with the SR), the top drivers into the result."""
    import dataclasses

    from dicom_fusion.inference.serve.explain import save_overlay
    from dicom_fusion.inference.serve.predict import Driver
    from dicom_fusion.service.outputs.sc.build import build_saliency_sc, peak_slice, render_overlay

    explanation = predictor.explain(image, tensor)
    n = rt.settings.model.explain_drivers
    drivers = tuple(Driver(a.name, a.attribution) for a in explanation.top_features(n)) if tensor is not None else ()
    save_overlay(image, explanation.saliency, d / "saliency.png", title=f"{result.finding.display}")
    prepared = _read_json(d / "prepared.json")
    # A volume's overlay shows the slice of the saliency peak (render_overlay); the SC then takes the
    # header of the source slice there (source_files are in slice order), so its position is that slice's.
    files, k = prepared["source_files"], peak_slice(explanation.saliency)
    index = 0 if k is None else min(len(files) - 1, k * len(files) // explanation.saliency.shape[0])
    source = source_header(dcmread(files[index], stop_before_pixels=True))
    note = "" if k is None else f"slice {k + 1} of {explanation.saliency.shape[0]}"
    sc = build_saliency_sc(source, render_overlay(image, explanation.saliency), sr_instance_uid=sr_uid,
                           model_name=result.model_name, model_version=result.model_version,
                           content_datetime=job.created_at, slice_note=note)
    buf = io.BytesIO()
    sc.save_as(buf, enforce_file_format=True)
    write_durable(d / "saliency.dcm", buf.getvalue(), fsync=rt.spool.fsync, replace=True)
    return dataclasses.replace(result, drivers=drivers)


def _segment(rt: Any, job: JobRef, d: Path, sr_uid: str) -> None:
    """Lesion segmentation of the model's series on its source grid: the DICOM SEG `seg.dcm` and its
    measurement `lesion.json` in the job folder (deliver sends the SEG with the SR, which measures it).
    No lesion found: `lesion.json` says so and there is no SEG."""
    from dicom_fusion.inference.data.images import decode_series, read_headers, select_series
    from dicom_fusion.service.outputs.seg.build import SegmentCodes, build_segmentation, measure_lesion

    models = rt.models(job.card_path)
    segmenter = models.segmenter
    headers, _ = read_headers(_job_files(rt, job))
    instances = select_series(headers, models.card.input)
    pixels, uids = decode_series(instances, segmenter.image_spec)
    by_uid = {h.sop_instance_uid: h.path for h in instances}
    sources = [source_header(dcmread(by_uid[u], stop_before_pixels=True)) for u in uids]
    lesion = segmenter.segment(pixels)
    if not lesion.mask.any():
        (d / "seg.dcm").unlink(missing_ok=True)
        _write_json(d / "lesion.json", {"status": "none", "model": lesion.model_name}, rt.spool.fsync)
        return
    label = segmenter.card.segment
    try:
        seg = build_segmentation(
            sources, lesion.mask, sr_instance_uid=sr_uid,
            segment=SegmentCodes(label.label, label.type_code, label.type_display, label.category_code,
                                 label.category_display),
            model_name=lesion.model_name, model_version=lesion.model_version, content_datetime=job.created_at)
    except ValueError as exc:
        # The sources cannot carry a SEG (e.g. a CT without Frame of Reference UID): retrying cannot
        # help, and the classification must still be delivered. Recorded in lesion.json, logged.
        log.warning("job %s: no DICOM SEG (%s); SR and report go without the lesion measurement",
                    job.job_id, exc)
        (d / "seg.dcm").unlink(missing_ok=True)
        _write_json(d / "lesion.json", {"status": "not_encodable", "reason": str(exc)}, rt.spool.fsync)
        return
    buf = io.BytesIO()
    seg.save_as(buf, enforce_file_format=True)
    write_durable(d / "seg.dcm", buf.getvalue(), fsync=rt.spool.fsync, replace=True)
    _write_json(d / "lesion.json", {"status": "segmented", **measure_lesion(lesion.mask, sources).to_dict()},
                rt.spool.fsync)


def _pacs_target(rt: Any) -> str:
    p = rt.settings.pacs
    return f"{p.ae_title}@{p.host}:{p.port}"


def deliver(rt: Any, job: JobRef) -> Stage:
    """Deliver the result (SR to PACS, report to FHIR, ORU to the RIS); each side is recorded separately in
    the ledger, so a retry sends only what is still owed.

    What leaves depends on the job's release mode (README "Review"): `auto` sends everything at once, the
    report `release.auto_status` and the SR unverified; `review` before a decision sends at most the
    preliminary report and parks the job (`Stage.REVIEW`); after an approval the SR goes VERIFIED and the
    report becomes final (the same resource updated); after a rejection only the preliminary report is
    marked entered-in-error and nothing goes to the PACS.
    """
    from dicom_fusion.inference.serve.predict import InferenceResult

    d = rt.spool.job_dir(job.job_id)
    facts = StudyFacts.from_dict(_read_json(d / "study.json"))
    result = InferenceResult.from_dict(_read_json(d / "result.json"))
    fhir = rt.settings.fhir
    hl7 = rt.settings.hl7
    report_target = fhir.shown_base_url if fhir.enabled else None  # a ledger row the API shows: no userinfo
    review = job.review
    series_uid, sr_uid = derive_sr_uids(facts.study_uid, result.model_name, result.model_version, job.version)
    if job.release == ReleaseMode.REVIEW and review is None:
        release = rt.settings.release
        rt.ledger.ensure_deliveries(job.job_id, targets={
            DeliveryKind.PRELIMINARY: report_target if release.send_preliminary else None,
            DeliveryKind.PRELIMINARY_SR: _pacs_target(rt) if release.send_preliminary_sr else None})
        _deliver_pending(rt, job, {
            DeliveryKind.PRELIMINARY: lambda: _deliver_report(rt, d, result, facts, job.version, status="preliminary"),
            DeliveryKind.PRELIMINARY_SR: lambda: _deliver_sr(rt, job, d, result, series_uid, sr_uid, None,
                                                             filename=PRELIMINARY_SR_FILE)})
        return Stage.REVIEW
    shown, model_finding = reviewed_result(result, review)
    verified = None
    if review is not None and review.verdict == ReviewVerdict.APPROVED:
        verified = verification(review, model_finding, review.organization or rt.settings.release.organization)
    if review is not None and review.verdict == ReviewVerdict.REJECTED:
        rt.ledger.ensure_deliveries(job.job_id, targets={DeliveryKind.REPORT: report_target})
        _deliver_pending(rt, job, {DeliveryKind.REPORT: lambda: _deliver_report(
            rt, d, result, facts, job.version, status="entered-in-error", rejected=review)})
        return Stage.FINISHED
    status = "final" if verified is not None else rt.settings.release.auto_status
    rt.ledger.ensure_deliveries(job.job_id, targets={
        DeliveryKind.SR: _pacs_target(rt),
        DeliveryKind.REPORT: report_target,
        DeliveryKind.HL7: f"{hl7.host}:{hl7.port}" if hl7.enabled else None,
    })
    predecessor = None
    if verified is not None and any(x.kind == DeliveryKind.PRELIMINARY_SR and x.state == DeliveryState.DELIVERED
                                    for x in rt.ledger.deliveries(job.job_id)):
        predecessor = d / PRELIMINARY_SR_FILE  # the UNVERIFIED SR in the PACS: a new SR replaces it
    final_sr_uid = derive_verified_sr_uid(sr_uid) if predecessor is not None else sr_uid
    _deliver_pending(rt, job, {
        DeliveryKind.SR: lambda: _deliver_sr(rt, job, d, shown, series_uid, final_sr_uid, verified,
                                             predecessor=predecessor),
        DeliveryKind.REPORT: lambda: _deliver_report(rt, d, shown, facts, job.version, status=status,
                                                     verified=verified),
        DeliveryKind.HL7: lambda: _deliver_hl7(rt, d, shown, facts, sr_uid, status=status, verified=verified),
    })
    return Stage.FINISHED


def _deliver_pending(rt: Any, job: JobRef, senders: dict[DeliveryKind, Callable[[], str]]) -> None:
    """Run the sender of every side still owed; record each outcome. A permanent failure ends the job (the
    caller's dead-letter path buries the rest); other failures are retried together."""
    failures: list[str] = []
    for kind in rt.ledger.pending_deliveries(job.job_id):
        send = senders.get(kind)
        if send is None:
            continue
        try:
            remote = send()
        except PermanentError as exc:
            rt.ledger.delivery_result(job.job_id, kind, ok=False, error=str(exc), dead=True)
            raise
        except Exception as exc:
            rt.ledger.delivery_result(job.job_id, kind, ok=False, error=f"{type(exc).__name__}: {exc}")
            failures.append(f"{kind}: {exc}")
            continue
        rt.ledger.delivery_result(job.job_id, kind, ok=True, remote_id=remote)
    if failures:
        raise TransientError("; ".join(failures))


#: The UNVERIFIED SR sent before review (`release.send_preliminary_sr`), kept to be referenced by the verified one.
PRELIMINARY_SR_FILE = "sr-preliminary.dcm"


def _deliver_sr(rt: Any, job: JobRef, d: Path, result: Any, series_uid: str, sr_uid: str,
                verified: SrVerification | None, *, filename: str = "sr.dcm", predecessor: Path | None = None) -> str:
    from dicom_fusion.service.errors import DeliveryError
    from dicom_fusion.service.outputs.dispatch import DicomNode, store_to_pacs
    from dicom_fusion.service.outputs.sr.build import build_sr, check_sr

    prepared = _read_json(d / "prepared.json")
    sources = [dcmread(p, stop_before_pixels=True) for p in prepared["source_files"]]
    saliency_path = d / "saliency.dcm"
    saliency = dcmread(saliency_path) if saliency_path.exists() else None
    segmentation, lesion = None, None
    if (d / "seg.dcm").exists():
        from dicom_fusion.service.outputs.seg.build import LesionMeasurement

        segmentation, lesion = dcmread(d / "seg.dcm"), LesionMeasurement.from_dict(_read_json(d / "lesion.json"))
    ds = build_sr(sources, result, sr_instance_uid=sr_uid, sr_series_uid=series_uid,
                  content_datetime=job.created_at, saliency=saliency, segmentation=segmentation, lesion=lesion,
                  verification=verified, predecessor=dcmread(predecessor) if predecessor is not None else None)
    check_sr(ds, expected=result, expected_lesion=lesion)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    write_durable(d / filename, buf.getvalue(), fsync=rt.spool.fsync, replace=True)
    p = rt.settings.pacs
    try:
        # SC and SEG first: a viewer that opens the SR finds the objects it references already there.
        objects = [o for o in (saliency, segmentation, ds) if o is not None]
        store_to_pacs(objects, DicomNode(p.ae_title, p.host, p.port), calling_ae=p.calling_ae_title,
                      timeout=p.timeout)
    except DeliveryError as exc:
        if not exc.retryable:
            raise PermanentError(str(exc)) from exc
        raise
    return sr_uid


def _deliver_report(rt: Any, d: Path, result: Any, facts: StudyFacts, version: int, *, status: str,
                    verified: SrVerification | None = None, rejected: Review | None = None) -> str:
    """Post (or update) the DiagnosticReport. Its identifier is the job's SR UID whatever the status, so a
    preliminary report, its approval and its rejection are versions of one resource."""
    from dicom_fusion.fhir.report import post_report

    _, sr_uid = derive_sr_uids(facts.study_uid, result.model_name, result.model_version, version)
    record = read_timeline_record(d / "timeline.json")
    patient_id = None
    if record.get("status") in ("ok", "empty"):
        patient_id = record.get("timeline", {}).get("patient_id")
    system = record.get("identifier_system") or identifier_system(rt.settings.fhir, facts.issuer)
    content = report_content(result, facts, sr_uid=sr_uid, patient_id=patient_id, system=system, status=status,
                             verified=verified)
    if rejected is not None:
        content = dataclasses.replace(content, interpreter=rejected.reviewer,
                                      review=tuple(rejection_lines(rejected.comment)))
    with rt.fhir_client() as client:
        outcome = post_report(client, content)
    name = "report.json" if status != "preliminary" else "preliminary-report.json"
    _write_json(d / name, {"report_id": outcome.report_id, "created": outcome.created,
                           "updated": outcome.updated, "status": status}, rt.spool.fsync)
    return f"DiagnosticReport/{outcome.report_id}"


def _deliver_hl7(rt: Any, d: Path, result: Any, facts: StudyFacts, sr_uid: str, *, status: str,
                 verified: SrVerification | None) -> str:
    """ORU^R01 to the RIS over MLLP; a rejection (AR) is permanent, anything else is retried."""
    from dicom_fusion.fhir.hl7v2 import Hl7Error, Hl7Header, build_oru, message_control_id
    from dicom_fusion.fhir.mllp import MllpTarget, send_message

    h = rt.settings.hl7
    record = read_timeline_record(d / "timeline.json")
    system = record.get("identifier_system") or identifier_system(rt.settings.fhir, facts.issuer)
    content = report_content(result, facts, sr_uid=sr_uid, patient_id=None, system=system, status=status,
                             verified=verified)
    header = Hl7Header(h.sending_app, h.sending_facility, h.receiving_app, h.receiving_facility)
    message = build_oru(content, header)
    control_id = message_control_id(content)
    write_durable(d / "oru.hl7", message.encode(), fsync=rt.spool.fsync, replace=True)
    try:
        send_message(message, control_id, MllpTarget(h.host, h.port, timeout=h.timeout, retries=h.retries),
                     redact=(facts.patient_id, facts.accession_number))
    except Hl7Error as exc:
        if not exc.retryable:
            raise PermanentError(str(exc)) from exc
        raise TransientError(str(exc)) from exc
    return f"MSH-10 {control_id}"
