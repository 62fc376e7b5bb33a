"""dicom_fusion.fhir against a real FHIR R4 server (sekmet-fhir on a loopback port).

Covers what a mock cannot: search parameter semantics, paging links, conditional creates inside a
transaction, urn:uuid reference resolution, OAuth2 client credentials, and a server that is down.
"""
from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.client import FhirAuth, FhirClient
from dicom_fusion.fhir.errors import AuthenticationError, FHIRUnavailable
from dicom_fusion.fhir.report import ReportContent, ReportFinding, post_report
from dicom_fusion.fhir.timeline import Timeline, fetch_timeline
from dicom_fusion.service.demo import components

pytestmark = pytest.mark.integration

STUDY_TIME = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
WINDOW_DAYS = 730
ISSUER = "urn:oid:1.2.826.0.1.3680043.8.498.77"
ALL_TYPES = ("Observation", "Condition", "MedicationRequest", "Encounter")
RUN = uuid.uuid4().hex[:8]  # keeps identifiers unique should the server outlive this module
MRN = f"FUSION-{RUN}"


# ---- test data ---------------------------------------------------------------------------------------------


@dataclass
class Cohort:
    """What was loaded, and the (kind, system, code, time, value) events expected in the window."""

    patient_id: str
    expected: list[tuple[str, str, str, datetime, float | None]] = field(default_factory=list)
    in_window_resources: int = 0


def _fmt(i: int, t: datetime) -> tuple[dict[str, Any], datetime]:
    """Vary the effective[x] shape the way real servers do; return it with the instant it means."""
    if i % 4 == 0:
        return {"effectivePeriod": {"start": t.strftime("%Y-%m-%dT%H:%M:%SZ")}}, t
    if i % 4 == 1:  # date only -> midnight UTC
        midnight = datetime(t.year, t.month, t.day, tzinfo=UTC)
        return {"effectiveDateTime": t.strftime("%Y-%m-%d")}, midnight
    if i % 4 == 2:
        return {"effectiveDateTime": t.astimezone(timezone(timedelta(hours=2))).isoformat()}, t
    return {"effectiveDateTime": t.strftime("%Y-%m-%dT%H:%M:%SZ")}, t


def _in_window(t: datetime) -> bool:
    return STUDY_TIME - timedelta(days=WINDOW_DAYS) <= t <= STUDY_TIME


def _cohort_bundle() -> tuple[dict[str, Any], list[tuple[str, str, str, datetime, float | None]], int]:
    pat = "urn:uuid:" + str(uuid.uuid4())
    other = "urn:uuid:" + str(uuid.uuid4())
    entries: list[dict[str, Any]] = [
        {"fullUrl": pat, "resource": {"resourceType": "Patient",
                                      "identifier": [{"system": ISSUER, "value": MRN}],
                                      "name": [{"family": "Test", "given": ["Timeline"]}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": other, "resource": {"resourceType": "Patient",
                                        "identifier": [{"system": ISSUER, "value": f"OTHER-{RUN}"}]},
         "request": {"method": "POST", "url": "Patient"}},
    ]
    expected: list[tuple[str, str, str, datetime, float | None]] = []
    used = 0

    def add(resource: dict[str, Any], events: list[tuple[str, str, str, datetime, float | None]]) -> None:
        nonlocal used
        entries.append({"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}})
        kept = [e for e in events if _in_window(e[3])]
        expected.extend(kept)
        used += bool(kept)

    # 400 observations every 66 h from two days after the study back over three years
    for i in range(400):
        t = STUDY_TIME + timedelta(days=2) - i * timedelta(hours=66)
        code = ("718-7", "Hemoglobin") if i % 2 else ("2345-7", "Glucose")
        eff, when = _fmt(i, t)
        value = round(10 + (i % 17) * 0.5, 1)
        add({"resourceType": "Observation", "status": "final", "subject": {"reference": pat},
             "code": {"coding": [{"system": "urn:lab:local", "code": f"L{code[0]}"},
                                 {"system": codes.LOINC, "code": code[0], "display": code[1]}]},
             "valueQuantity": {"value": value, "unit": "g/dL", "system": codes.UCUM, "code": "g/dL"}, **eff},
            [("observation", codes.LOINC, code[0], when, value)])
    conditions = [("2024-11-02", None), ("2019-05-05", None), (None, "2024-01-10T08:00:00Z")]
    for n, (onset, recorded) in enumerate(conditions):
        cond: dict[str, Any] = {"resourceType": "Condition", "subject": {"reference": pat},
                                "code": {"coding": [{"system": codes.SNOMED_CT, "code": f"4405400{n}"}]}}
        if onset:
            cond["onsetDateTime"] = onset
        if recorded:
            cond["recordedDate"] = recorded
        t = datetime.fromisoformat(onset or recorded or "")
        t = t if t.tzinfo else t.replace(tzinfo=UTC)
        add(cond, [("condition", codes.SNOMED_CT, f"4405400{n}", t, None)])
    for n, authored in enumerate(["2024-12-24T10:00:00Z", "2020-02-02T10:00:00Z", "2025-03-02T10:00:00Z"]):
        add({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
             "subject": {"reference": pat}, "authoredOn": authored,
             "medicationCodeableConcept": {"coding": [{"system": codes.RXNORM, "code": f"86097{n}"}]}},
            [("medication", codes.RXNORM, f"86097{n}", datetime.fromisoformat(authored), None)])
    for klass, start in [("AMB", "2025-02-01T08:00:00Z"), ("IMP", "2021-06-01T08:00:00Z"),
                         ("EMER", "2023-08-15T22:10:00Z")]:
        add({"resourceType": "Encounter", "status": "finished", "subject": {"reference": pat},
             "class": {"system": codes.V3_ACT_CODE, "code": klass},
             "period": {"start": start, "end": start.replace(":00:00Z", ":59:00Z")}},
            [("encounter", codes.V3_ACT_CODE, klass, datetime.fromisoformat(start), None)])
    # the other patient's data is in the window too, and must not leak into ours
    for i in range(20):
        entries.append({"resource": {
            "resourceType": "Observation", "status": "final", "subject": {"reference": other},
            "code": {"coding": [{"system": codes.LOINC, "code": "718-7"}]},
            "effectiveDateTime": (STUDY_TIME - timedelta(days=i + 1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": 99.0, "unit": "g/dL"}},
            "request": {"method": "POST", "url": "Observation"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}, expected, used


@pytest.fixture(scope="module")
def cohort(fhir_server: components.FhirServer) -> Cohort:
    bundle, expected, used = _cohort_bundle()
    with FhirClient(fhir_server.base_url, timeout=60) as client:
        response = client.transaction(bundle)
        location = response["entry"][0]["response"]["location"]
        patient_id = location.split("/Patient/")[1].split("/")[0]
        # two records sharing one identifier, for the ambiguous case
        dup = {"resourceType": "Patient", "identifier": [{"system": ISSUER, "value": f"DUP-{RUN}"}]}
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": dup, "request": {"method": "POST", "url": "Patient"}},
            {"resource": dup, "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient",
                          "identifier": [{"system": ISSUER, "value": f"QUIET-{RUN}"}]},
             "request": {"method": "POST", "url": "Patient"}}]})
    assert len(expected) > 250
    return Cohort(patient_id, sorted(expected, key=lambda e: (e[3], e[0], e[1], e[2])), used)


class RequestLog:
    """httpx event hook: remembers every request the client sends."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> None:
        self.requests.append(request)

    def paths(self, suffix: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path.endswith(suffix)]


def _client(base_url: str, log: RequestLog | None = None, **kw: Any) -> FhirClient:
    hooks = {"request": [log]} if log else None
    return FhirClient(base_url, event_hooks=hooks, **kw)  # type: ignore[dict-item]


# ---- timeline ----------------------------------------------------------------------------------------------


def test_timeline_has_exactly_the_in_window_events_across_pages(fhir_server, cohort):
    log = RequestLog()
    with _client(fhir_server.base_url, log) as client:
        timeline, resources = fetch_timeline(client, identifier_system=ISSUER, identifier_value=MRN,
                                             study_time=STUDY_TIME, window_days=WINDOW_DAYS,
                                             resource_types=ALL_TYPES)
    assert timeline.status == "ok" and timeline.patient_id == cohort.patient_id
    got = [(e.kind, e.system, e.code, e.time, e.value) for e in timeline.events]
    assert got == cohort.expected
    assert timeline.resource_count == len(resources) == cohort.in_window_resources
    assert all(r["subject"]["reference"] == f"Patient/{cohort.patient_id}" for r in resources)
    obs_requests = log.paths("/Observation")
    assert len(obs_requests) >= 2, "more than 200 observations in the window must take several pages"
    assert obs_requests[0].url.params["_count"] == "200"
    assert obs_requests[1].url.params.get("_offset") == "200"


def test_timeline_with_a_small_page_size_is_identical(fhir_server, cohort):
    log = RequestLog()
    with _client(fhir_server.base_url, log, page_size=37) as client:
        timeline, _ = fetch_timeline(client, identifier_system=ISSUER, identifier_value=MRN,
                                     study_time=STUDY_TIME, window_days=WINDOW_DAYS,
                                     resource_types=["observation"])
    assert [(e.kind, e.code, e.time) for e in timeline.events] == [
        (e[0], e[2], e[3]) for e in cohort.expected if e[0] == "observation"]
    assert len(log.paths("/Observation")) >= 8


def test_unknown_identifier_gives_no_patient(fhir_server, cohort):
    with _client(fhir_server.base_url) as client:
        timeline, resources = fetch_timeline(client, identifier_system=ISSUER, identifier_value=f"NOPE-{RUN}",
                                             study_time=STUDY_TIME, window_days=WINDOW_DAYS,
                                             resource_types=ALL_TYPES)
        assert (timeline.status, timeline.patient_id, timeline.events) == ("no_patient", None, ())
        assert resources == []
        # same value under another issuer is another patient
        timeline, _ = fetch_timeline(client, identifier_system="urn:oid:9.9", identifier_value=MRN,
                                     study_time=STUDY_TIME, window_days=WINDOW_DAYS, resource_types=ALL_TYPES)
        assert timeline.status == "no_patient"


def test_shared_identifier_is_ambiguous_and_quiet_patient_is_empty(fhir_server, cohort):
    with _client(fhir_server.base_url) as client:
        dup, _ = fetch_timeline(client, identifier_system=ISSUER, identifier_value=f"DUP-{RUN}",
                                study_time=STUDY_TIME, window_days=WINDOW_DAYS, resource_types=ALL_TYPES)
        quiet, _ = fetch_timeline(client, identifier_system=ISSUER, identifier_value=f"QUIET-{RUN}",
                                  study_time=STUDY_TIME, window_days=WINDOW_DAYS, resource_types=ALL_TYPES)
    assert dup.status == "ambiguous_patient" and dup.patient_id is None
    assert quiet.status == "empty" and quiet.patient_id is not None


# ---- report ------------------------------------------------------------------------------------------------


def _content(patient_id: str | None, sr_uid: str, study_uid: str, **kw: Any) -> ReportContent:
    normal = ReportFinding("17621005", codes.SNOMED_CT, "Normal", 0.3)
    abnormal = ReportFinding("263654008", codes.SNOMED_CT, "Abnormal", 0.7)
    args: dict[str, Any] = dict(identifier=sr_uid, patient_id=patient_id, patient_identifier=(ISSUER, MRN),
                                study_instance_uid=study_uid, accession_number="ACC-1", effective=STUDY_TIME,
                                model_name="hybrid-test", model_version="0.1.0",
                                probabilities=(normal, abnormal), finding=abnormal, image_only=False,
                                image_only_reason=None)
    args.update(kw)
    return ReportContent(**args)


def _uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def _search_all(client: FhirClient, rtype: str, params: dict[str, str]) -> list[dict[str, Any]]:
    return list(client.search(rtype, params))


def test_post_report_twice_creates_one_report_and_links_the_imaging_study(fhir_server, cohort):
    sr_uid, study_uid = _uid(), _uid()
    content = _content(cohort.patient_id, sr_uid, study_uid)
    with _client(fhir_server.base_url) as client:
        study = client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": [{
            "resource": {"resourceType": "ImagingStudy", "status": "available",
                         "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
                         "subject": {"reference": f"Patient/{cohort.patient_id}"}},
            "request": {"method": "POST", "url": "ImagingStudy"}}]})
        study_id = study["entry"][0]["response"]["location"].split("/ImagingStudy/")[1].split("/")[0]
        subject = {"subject": f"Patient/{cohort.patient_id}", "category": "imaging"}

        first = post_report(client, content)
        obs_after_first = _search_all(client, "Observation", subject)
        second = post_report(client, content)
        obs_after_second = _search_all(client, "Observation", subject)

        reports = _search_all(client, "DiagnosticReport", {"identifier": f"urn:dicom:uid|urn:oid:{sr_uid}"})
        assert (first.created, second.created) == (True, False)
        assert first.report_id == second.report_id
        assert len(reports) == 1 and reports[0]["id"] == first.report_id
        assert len(obs_after_first) == len(obs_after_second) == 3
        report = client.read("DiagnosticReport", first.report_id)

    DiagnosticReport.model_validate(report)
    assert report["subject"] == {"reference": f"Patient/{cohort.patient_id}"}
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study_id}"}]
    result_ids = {r["reference"].split("/")[-1] for r in report["result"]}
    assert result_ids == {o["id"] for o in obs_after_first}
    assert "Abnormal (probability 0.70)" in report["conclusion"]


def test_report_for_an_unmatched_patient_references_the_identifier(fhir_server):
    sr_uid = _uid()
    content = _content(None, sr_uid, _uid(), image_only=True, image_only_reason="no Patient matched")
    with _client(fhir_server.base_url) as client:
        outcome = post_report(client, content)
        report = client.read("DiagnosticReport", outcome.report_id)
    assert outcome.created
    assert report["subject"] == {"type": "Patient", "identifier": {"system": ISSUER, "value": MRN}}
    assert "imagingStudy" not in report
    assert report["conclusion"].endswith("image-only: no Patient matched")


# ---- failure modes -----------------------------------------------------------------------------------------


def test_fhir_down_raises_unavailable_after_retries():
    port = components.free_port()  # nothing listens there
    log = RequestLog()
    base = f"http://127.0.0.1:{port}/fhir"
    started = time.monotonic()
    with _client(base, log, retries=2, backoff=0.05, timeout=2) as client:
        with pytest.raises(FHIRUnavailable) as info:
            fetch_timeline(client, identifier_system=ISSUER, identifier_value=MRN, study_time=STUDY_TIME,
                           window_days=WINDOW_DAYS, resource_types=ALL_TYPES)
    assert len(log.requests) == 3
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert base in message and "unreachable" in message and "after 3 attempt" in message
    assert "check fhir.base_url" in message.lower()
    assert MRN not in message


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[components.FhirServer]:
    """A second sekmet that requires OAuth2 client-credentials (shared-secret) tokens."""
    exe = components.sekmet_executable()
    if exe is None:
        pytest.skip("sekmet-fhir is not installed (pip extra [dev])")
    workdir = tmp_path_factory.mktemp("fhir-auth")
    port = components.free_port()
    (workdir / "settings.yaml").write_text(
        f"base_url: http://127.0.0.1:{port}/fhir\nhost: 127.0.0.1\nport: {port}\n"
        f"data_dir: {workdir / 'data'}\nlog_inbound: false\nsimulator: {{enabled: false}}\n"
        "validation: {inbound: warn}\n"
        "server_auth:\n  types: [smart]\n  smart_clients:\n"
        "    - {client_id: dicom-fusion, client_secret: s3cret-value,\n"
        "       scopes: 'system/*.read system/*.write'}\n")
    logfile = workdir / "sekmet.log"
    with logfile.open("wb") as fh:
        proc = subprocess.Popen([exe, "serve", "-c", str(workdir / "settings.yaml")], cwd=workdir, stdout=fh,
                                stderr=subprocess.STDOUT)
    server = components.FhirServer("fhir-auth", proc, workdir, logfile, port=port)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, logfile.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"sekmet did not start; see {logfile}"
                time.sleep(0.1)
        yield server
    finally:
        server.stop()


def test_oauth2_client_credentials(secured_server, caplog):
    base = secured_server.base_url
    token_url = f"http://127.0.0.1:{secured_server.port}/auth/token"
    with _client(base) as anonymous:
        with pytest.raises(AuthenticationError, match="HTTP 401"):
            list(anonymous.search("Patient", {"identifier": "x"}))

    log = RequestLog()
    auth = FhirAuth("client_credentials", token_url=token_url, client_id="dicom-fusion",
                    client_secret="s3cret-value", scope="system/*.read system/*.write")
    with caplog.at_level("DEBUG", logger="dicom_fusion"), _client(base, log, auth=auth) as client:
        timeline, _ = fetch_timeline(client, identifier_system=ISSUER, identifier_value=MRN,
                                     study_time=STUDY_TIME, window_days=30, resource_types=ALL_TYPES)
        assert timeline.status == "no_patient"
        assert post_report(client, _content(None, _uid(), _uid())).created
    assert len(log.paths("/auth/token")) == 1, "the token must be cached across requests"
    assert "obtained an access token" in caplog.text  # the log was captured, and says no more than that
    assert "s3cret-value" not in caplog.text
    assert "eyJ" not in caplog.text  # sekmet's access tokens are JWTs: none may reach the logs

    wrong = FhirAuth("client_credentials", token_url=token_url, client_id="dicom-fusion",
                     client_secret="nope")
    with _client(base, auth=wrong) as client:
        with pytest.raises(AuthenticationError, match="fhir.auth.client_id"):
            client.read("Patient", "x")


# ---- units and _elements -----------------------------------------------------------------------------------


def _glucose_patient(client: FhirClient) -> str:
    """A patient whose labs come in every unit shape seen in the wild; returns its identifier value."""
    mrn = f"UNITS-{RUN}"
    pat = "urn:uuid:" + str(uuid.uuid4())
    rows = [  # (LOINC, value, valueQuantity unit fields, days before the study)
        ("2345-7", 100.0, {"unit": "mg/dL", "system": codes.UCUM, "code": "mg/dL"}, 1),
        ("2345-7", 5.5, {"unit": "mmol/l", "system": codes.UCUM, "code": "mmol/L"}, 2),
        ("2345-7", 90.0, {"unit": "mg/dl"}, 3),  # display text only, non-UCUM spelling
        ("2345-7", 7.0, {"unit": "mg", "system": codes.UCUM, "code": "mg"}, 4),  # a mass: not convertible
        ("2345-7", 6.0, {}, 5),  # no unit at all: ambiguous
        ("8480-6", 16.0, {"unit": "kPa", "system": codes.UCUM, "code": "kPa"}, 6),
        ("8480-6", 121.0, {"unit": "mmHg"}, 7),
        ("4548-4", 48.0, {"unit": "mmol/mol", "system": codes.UCUM, "code": "mmol/mol"}, 8),  # not targeted
    ]
    entries: list[dict[str, Any]] = [{"fullUrl": pat, "resource": {
        "resourceType": "Patient", "identifier": [{"system": ISSUER, "value": mrn}]},
        "request": {"method": "POST", "url": "Patient"}}]
    for code, value, unit, days in rows:
        entries.append({"resource": {
            "resourceType": "Observation", "status": "final", "subject": {"reference": pat},
            "code": {"coding": [{"system": codes.LOINC, "code": code}]},
            "effectiveDateTime": (STUDY_TIME - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "valueQuantity": {"value": value, **unit}}, "request": {"method": "POST", "url": "Observation"}})
    client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return mrn


def test_units_are_normalised_to_the_models_and_unconvertible_values_dropped(fhir_server, caplog):
    targets = {f"{codes.LOINC}|2345-7": "mg/dL", f"{codes.LOINC}|8480-6": "mm[Hg]"}
    with _client(fhir_server.base_url) as client:
        mrn = _glucose_patient(client)
        with caplog.at_level("WARNING", logger="dicom_fusion"):
            timeline, resources = fetch_timeline(client, identifier_system=ISSUER, identifier_value=mrn,
                                                 study_time=STUDY_TIME, window_days=30,
                                                 resource_types=["Observation"], target_units=targets)
    got = sorted(((e.code, round(e.value, 2), e.unit) for e in timeline.events), reverse=True)
    assert got == [("8480-6", 121.0, "mm[Hg]"), ("8480-6", 120.01, "mm[Hg]"), ("4548-4", 48.0, "mmol/mol"),
                   ("2345-7", 100.0, "mg/dL"), ("2345-7", 99.09, "mg/dL"), ("2345-7", 90.0, "mg/dL")]
    assert timeline.dropped_values == 2
    assert len(resources) == timeline.resource_count == 6  # the dropped values' resources were not used
    assert "dropped 2 value(s)" in caplog.text
    assert "2345-7 in 'mg' ×1" in caplog.text and "in no unit ×1" in caplog.text  # a placeholder, not a unit
    assert mrn not in caplog.text
    assert Timeline.from_dict(timeline.to_dict()) == timeline


def test_elements_fetch_the_same_timeline_with_smaller_resources(fhir_server, cohort):
    log = RequestLog()
    with _client(fhir_server.base_url, log) as client:
        full, full_resources = fetch_timeline(client, identifier_system=ISSUER, identifier_value=MRN,
                                              study_time=STUDY_TIME, window_days=WINDOW_DAYS,
                                              resource_types=ALL_TYPES)
        lean, lean_resources = fetch_timeline(client, identifier_system=ISSUER, identifier_value=MRN,
                                              study_time=STUDY_TIME, window_days=WINDOW_DAYS,
                                              resource_types=ALL_TYPES, elements=True)
    assert lean == full and len(lean_resources) == len(full_resources)
    assert any("_elements" in r.url.params for r in log.requests)
    # the server sent subsets: e.g. the Observations' local coding is kept but nothing else outside the list
    assert all(set(r) <= {"resourceType", "id", "meta", "status", "subject", "code", "effectiveDateTime",
                          "effectivePeriod", "effectiveInstant", "valueQuantity", "valueInteger", "component",
                          "onsetDateTime", "onsetPeriod", "recordedDate", "verificationStatus", "authoredOn",
                          "medicationCodeableConcept", "medicationReference", "contained", "class", "period"}
               for r in lean_resources)
    assert any("intent" in r for r in full_resources) and not any("intent" in r for r in lean_resources)
