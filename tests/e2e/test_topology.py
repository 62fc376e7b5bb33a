"""The production topology end to end (issue 19, item 2): PostgreSQL + Redis + two `serve --no-worker`
listeners on one port + one worker per queue + `api`, Orthanc and the FHIR server, each its own
process started as the README documents (tests/topology.py). 20 studies over 4 associations: each gets
exactly one SR and one DiagnosticReport; /api/queues and /metrics agree with the ledger."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from topology import PHI, Topology, acknowledged, study_files, upload_cohort

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, PostgresServer, RedisServer

pytestmark = [pytest.mark.e2e, pytest.mark.integration, pytest.mark.timeout(600)]

STUDIES, ASSOCIATIONS = 20, 4


@pytest.fixture
def cohort(tmp_path: Path, fhir_server: FhirServer) -> list[SyntheticPatient]:
    patients = generate_cohort(STUDIES, tmp_path / "cohort", seed=19, progress=False)
    upload_cohort(fhir_server, patients)
    return patients


@pytest.fixture
def topology(tmp_path: Path, postgres_server: PostgresServer, redis_server: RedisServer, orthanc: Pacs,
             fhir_server: FhirServer) -> Iterator[Topology]:
    topo = Topology.start(tmp_path / "topology", postgres_server, redis_server, orthanc, fhir_server)
    try:
        yield topo
    finally:
        topo.stop()


def test_production_topology(topology: Topology, cohort: list[SyntheticPatient], storescu: str) -> None:
    topo = topology
    groups = [[f for p in cohort[i::ASSOCIATIONS] for f in study_files(p)] for i in range(ASSOCIATIONS)]
    sent = sum(len(g) for g in groups)
    t0 = time.monotonic()
    results = topo.send_parallel(storescu, groups)
    for r in results:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sum(acknowledged(r) for r in results) == sent
    uids = [p.study_instance_uid for p in cohort]
    done_at = topo.wait_done(uids)
    print(f"topology: {STUDIES} studies ({sent} instances, {ASSOCIATIONS} associations) done "
          f"{done_at - t0:.1f}s after the first association opened")

    # each study: one job, done; exactly one SR in Orthanc and one DiagnosticReport in FHIR
    states = topo.job_states(uids)
    assert all(v == [(1, "done")] for v in states.values()), states
    for p in cohort:
        assert topo.sr_count(p.study_instance_uid) == 1, p.study_instance_uid
        assert topo.report_count(p) == 1, p.study_instance_uid

    # both listeners served (the kernel spreads associations over SO_REUSEPORT sockets at random, so
    # one may have got all four: then the other at least answered and shares the port)
    per_listener = {name: topo.listener_associations(name) for name in ("listener-1", "listener-2")}
    assert sum(per_listener.values()) == ASSOCIATIONS, per_listener
    print(f"topology: associations accepted per listener (their metrics) {per_listener}")

    # the API's views agree with the ledger
    counts = topo.ledger_counts()
    assert counts["instances"] == sent and counts["studies"] == STUDIES
    assert counts["jobs"] == counts["jobs_done"] == STUDIES
    status, body = topo.api_get("/api/queues")
    assert status == 200, body
    queues = json.loads(body)
    assert queues["broker_error"] is None
    by_name = {q["name"]: q for q in queues["queues"]}
    assert set(by_name) == {"cpu", "gpu", "io"}
    for q in by_name.values():  # nothing left anywhere, as the ledger says (every job done)
        assert (q["depth"], q["waiting"], q["in_flight"]) == (0, 0, 0), q
    assert queues["workers"] is not None and len(queues["workers"]) == 3, queues["workers"]
    m = topo.metrics()
    assert m[("dicom_fusion_instances_received_total", (("result", "stored"),))] == counts["instances"]
    assert m[("dicom_fusion_studies_received_total", ())] == counts["studies"]
    assert m[("dicom_fusion_jobs_created_total", ())] == counts["jobs"]
    assert m[("dicom_fusion_studies_completed_total", ())] == counts["jobs_done"]
    assert m[("dicom_fusion_jobs", (("state", "done"),))] == counts["jobs_done"]
    assert sum(v for (name, labels), v in m.items() if name == "dicom_fusion_jobs") == counts["jobs"]
    assert m[("dicom_fusion_broker_up", ())] == 1
    for q in ("cpu", "gpu", "io"):
        assert m[("dicom_fusion_queue_depth", (("queue", q),))] == by_name[q]["depth"] == 0
        assert m[("dicom_fusion_jobs_in_flight", (("queue", q),))] == 0
    assert m[("dicom_fusion_job_latency_seconds_count", ())] == counts["jobs_done"]

    # no patient data in any process's log
    text = topo.logs_text()
    for phi in PHI + tuple(p.patient_id for p in cohort):
        assert phi not in text, f"{phi!r} leaked into a log"


def test_a_worker_without_the_shared_spool_waits_and_says_why(
        tmp_path: Path, postgres_server: PostgresServer, redis_server: RedisServer, orthanc: Pacs,
        fhir_server: FhirServer, storescu: str) -> None:
    """Issue 19 item 5. Every piece has its own data folder and shares only the spool path, the ledger and
    the broker (two hosts). Here the cpu worker's `spool.dir` is a folder of its own (the shared volume
    not mounted there): prepare refuses with the missing file and the setting named, the job is retried
    (`failed`, never `dead`, never run on part of the study); once the worker restarts with the shared
    spool, the job finishes with exactly one SR and one report."""
    patient = generate_cohort(1, tmp_path / "cohort", seed=23, progress=False)[0]
    upload_cohort(fhir_server, [patient])
    not_shared = tmp_path / "worker-cpu-own-spool"
    topo = Topology.start(tmp_path / "topology", postgres_server, redis_server, orthanc, fhir_server,
                          extra_env={"DICOM_FUSION_WORKER__RETRY_BACKOFF_SECONDS": "1"},
                          piece_env={"worker-cpu": {"DICOM_FUSION_SPOOL__DIR": str(not_shared)}})
    try:
        result = topo.storescu(storescu, study_files(patient))
        assert result.returncode == 0 and acknowledged(result) == len(study_files(patient))
        uid = patient.study_instance_uid
        deadline, job, seen = time.monotonic() + 60, None, set()
        while time.monotonic() < deadline:
            jobs = topo.ledger.jobs_for_study(uid)
            job = jobs[-1] if jobs else None
            if job is not None:
                seen.add(str(job.state))
                if job.attempts >= 2 and job.state == "failed":
                    break
            time.sleep(0.2)
        assert job is not None and job.attempts >= 2 and job.state == "failed", (job, seen)
        assert "dead" not in seen and "done" not in seen, seen
        assert "outside this host's spool" in (job.error or "") and "spool.dir" in (job.error or ""), job.error
        assert str(tmp_path / "topology" / "spool") in (job.error or "")  # the ledger's path, as written
        assert not (not_shared / "jobs").exists() or not any((not_shared / "jobs").iterdir())
        worker = topo.pieces["worker-cpu"]
        worker.stop()
        worker.env["DICOM_FUSION_SPOOL__DIR"] = str(tmp_path / "topology" / "spool")  # the volume mounted
        worker.start()
        topo.wait_done([uid], timeout=180)
        assert topo.job_states([uid]) == {uid: [(1, "done")]}
        assert topo.sr_count(uid) == 1
        # by the SR UID the report carries as identifier: the module's other test uploads a patient with
        # the same FHIR id (synthetic cohorts number from 0), so the subject alone would count its report too
        [done] = topo.ledger.jobs_for_study(uid)
        with FhirClient(fhir_server.base_url) as client:
            reports = list(client.search("DiagnosticReport", {
                "identifier": f"{codes.DICOM_UID_SYSTEM}|urn:oid:{done.sr_uid}"}))
        assert len(reports) == 1
        print(f"shared spool: {job.attempts} attempt(s) refused on the worker without the spool "
              f"({(job.error or '')[:80]}...), done after its restart with the shared spool")
    finally:
        topo.stop()
