"""Timeline: FHIR resources -> typed events (fhir/events.py), window and subject checks, patient matching.

The fake client below stands in for a server that ignores search parameters (which real servers do), to
show the client-side filters hold; paging and HTTP live in test_fhir_client.py, a real server in
tests/integration/test_fhir_server.py.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.errors import FHIRUnavailable
from dicom_fusion.fhir.events import (
    MAX_DISPLAY,
    TimelineEvent,
    events_from_resource,
    extract_events,
    normalise_resource_types,
    parse_fhir_datetime,
)
from dicom_fusion.fhir.timeline import PatientMatch, Timeline, fetch_timeline, read_timeline, resolve_patient

STUDY = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


class FakeClient:
    """Answers every search of a type with the same resources, whatever the parameters."""

    def __init__(self, resources: dict[str, list[dict[str, Any]]], fail: Exception | None = None):
        self.resources = resources
        self.fail = fail
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def search(self, resource_type: str, params: Any) -> Any:
        pairs = list(params.items()) if isinstance(params, dict) else list(params)
        self.calls.append((resource_type, pairs))
        if self.fail:
            raise self.fail
        return iter(self.resources.get(resource_type, []))


def patient(pid: str, active: bool | None = None) -> dict[str, Any]:
    """A Patient carrying the identifier the tests search for (urn:oid:1.2|MRN1)."""
    p: dict[str, Any] = {"resourceType": "Patient", "id": pid,
                         "identifier": [{"system": "urn:oid:1.2", "value": "MRN1"}]}
    if active is not None:
        p["active"] = active
    return p


def obs(oid: str, when: str, code: str = "718-7", value: float | None = 13.1, subject: str = "Patient/p1",
        **extra: Any) -> dict[str, Any]:
    o: dict[str, Any] = {"resourceType": "Observation", "id": oid, "status": "final",
                         "code": {"coding": [{"system": codes.LOINC, "code": code, "display": "Hemoglobin"}]},
                         "subject": {"reference": subject}, "effectiveDateTime": when}
    if value is not None:
        o["valueQuantity"] = {"value": value, "unit": "g/dL", "system": codes.UCUM, "code": "g/dL"}
    o.update(extra)
    return o


# ---- date parsing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2021", datetime(2021, 1, 1, tzinfo=UTC)),
    ("2021-03", datetime(2021, 3, 1, tzinfo=UTC)),
    ("2021-03-04", datetime(2021, 3, 4, tzinfo=UTC)),
    ("2021-03-04T10:20:30Z", datetime(2021, 3, 4, 10, 20, 30, tzinfo=UTC)),
    ("2021-03-04T10:20:30.250+02:00", datetime(2021, 3, 4, 8, 20, 30, 250000, tzinfo=UTC)),
    ("2021-03-04T10:20:30", datetime(2021, 3, 4, 10, 20, 30, tzinfo=UTC)),
    ("2021-03-04T10:20", datetime(2021, 3, 4, 10, 20, tzinfo=UTC)),
])
def test_fhir_dates_parse_to_utc(text, expected):
    parsed = parse_fhir_datetime(text)
    assert parsed == expected and parsed.tzinfo == UTC


@pytest.mark.parametrize("text", ["", None, "yesterday", "2021-13-01", "21-03-04", "2021-02-30"])
def test_unparseable_dates_are_none(text):
    assert parse_fhir_datetime(text) is None


# ---- resource -> events ------------------------------------------------------------------------------------


def test_observation_prefers_loinc_and_reads_quantity():
    o = obs("o1", "2024-05-01T08:00:00Z")
    o["code"]["coding"].insert(0, {"system": "urn:local", "code": "HGB"})
    (e,) = events_from_resource(o)
    assert (e.kind, e.system, e.code, e.value, e.unit, e.display) == (
        "observation", codes.LOINC, "718-7", 13.1, "g/dL", "Hemoglobin")
    assert e.time == datetime(2024, 5, 1, 8, tzinfo=UTC)


def test_observation_falls_back_to_first_coding_and_period_start():
    o = obs("o1", "x", value=None)
    del o["effectiveDateTime"]
    o["effectivePeriod"] = {"start": "2024-05-02", "end": "2024-05-03"}
    o["code"] = {"coding": [{"system": "urn:local", "code": "X"}], "text": "local test"}
    o["valueInteger"] = 7
    (e,) = events_from_resource(o)
    assert (e.system, e.code, e.value, e.display) == ("urn:local", "X", 7.0, "local test")
    assert e.time == datetime(2024, 5, 2, tzinfo=UTC)


def test_observation_components_become_events():
    bp = obs("bp", "2024-05-01T08:00:00Z", code="85354-9", value=None)
    bp["component"] = [
        {"code": {"coding": [{"system": codes.LOINC, "code": "8480-6"}]},
         "valueQuantity": {"value": 120, "unit": "mm[Hg]"}},
        {"code": {"coding": [{"system": codes.LOINC, "code": "8462-4"}]},
         "valueQuantity": {"value": 80, "unit": "mm[Hg]"}},
    ]
    assert [(e.code, e.value) for e in events_from_resource(bp)] == [("8480-6", 120.0), ("8462-4", 80.0)]


@pytest.mark.parametrize("resource", [
    obs("o", "2024-05-01", status="entered-in-error"),
    {**obs("o", "2024-05-01"), "effectiveDateTime": None},
    {**obs("o", "2024-05-01"), "code": {"text": "no coding"}},
    {"resourceType": "Procedure", "id": "x", "performedDateTime": "2024-05-01"},
])
def test_unusable_resources_give_no_events(resource):
    assert events_from_resource(resource) == []


def test_condition_prefers_snomed_and_onset_then_recorded_date():
    cond = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"},
                                {"system": codes.SNOMED_CT, "code": "44054006", "display": "Diabetes"}]},
            "recordedDate": "2024-02-01", "onsetDateTime": "2023-01-15"}
    (e,) = events_from_resource(cond)
    assert (e.kind, e.system, e.code, e.value, e.time) == (
        "condition", codes.SNOMED_CT, "44054006", None, datetime(2023, 1, 15, tzinfo=UTC))
    del cond["onsetDateTime"]
    assert events_from_resource(cond)[0].time == datetime(2024, 2, 1, tzinfo=UTC)
    cond["verificationStatus"] = {"coding": [{"code": "refuted"}]}
    assert events_from_resource(cond) == []


def test_medication_request_prefers_rxnorm_and_reads_contained_medication():
    med = {"resourceType": "MedicationRequest", "id": "m", "status": "active", "intent": "order",
           "authoredOn": "2024-04-01T09:00:00+01:00", "subject": {"reference": "Patient/p1"},
           "medicationCodeableConcept": {"coding": [{"system": "urn:atc", "code": "A10BA02"},
                                                    {"system": codes.RXNORM, "code": "860975"}]}}
    (e,) = events_from_resource(med)
    assert (e.kind, e.system, e.code, e.time) == ("medication", codes.RXNORM, "860975",
                                                  datetime(2024, 4, 1, 8, tzinfo=UTC))
    del med["medicationCodeableConcept"]
    med["contained"] = [{"resourceType": "Medication", "id": "med1",
                         "code": {"coding": [{"system": codes.RXNORM, "code": "197361"}]}}]
    med["medicationReference"] = {"reference": "#med1"}
    assert events_from_resource(med)[0].code == "197361"


@pytest.mark.parametrize("klass", [
    {"system": codes.V3_ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
    [{"coding": [{"system": codes.V3_ACT_CODE, "code": "IMP", "display": "inpatient encounter"}]}],
])
def test_encounter_uses_class_code_and_period_start(klass):
    enc = {"resourceType": "Encounter", "id": "e", "status": "finished", "class": klass,
           "subject": {"reference": "Patient/p1"}, "period": {"start": "2024-03-01T10:00:00Z"}}
    (e,) = events_from_resource(enc)
    assert (e.kind, e.system, e.code) == ("encounter", codes.V3_ACT_CODE, "IMP")
    assert e.display == "inpatient encounter"
    enc["status"] = "cancelled"
    assert events_from_resource(enc) == []


# ---- Timeline serialisation --------------------------------------------------------------------------------


def test_timeline_round_trips_through_json():
    tl = Timeline("ok", "p1", (
        TimelineEvent("observation", codes.LOINC, "718-7", datetime(2024, 1, 2, 3, 4, 5, 600, tzinfo=UTC),
                      12.5, "g/dL", "Hemoglobin"),
        TimelineEvent("condition", codes.SNOMED_CT, "44054006", datetime(2023, 1, 1, tzinfo=UTC)),
    ), 2)
    data = json.loads(json.dumps(tl.to_dict()))
    assert data["events"][1]["time"] == "2023-01-01T00:00:00Z"
    assert Timeline.from_dict(data) == tl


def test_timeline_rejects_unknown_status_and_naive_times():
    with pytest.raises(ValueError, match="status"):
        Timeline.from_dict({"status": "fine", "patient_id": None, "events": []})
    with pytest.raises(ValueError, match="timezone"):
        TimelineEvent("observation", "s", "c", datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="kind"):
        TimelineEvent("lab", "s", "c", datetime(2024, 1, 1, tzinfo=UTC))


def test_resource_type_names_are_normalised():
    assert normalise_resource_types(["observation", "MedicationRequest", "medication", "Encounter "]) == (
        "Observation", "MedicationRequest", "Encounter")
    with pytest.raises(ValueError, match="supported: Observation"):
        normalise_resource_types(["Procedure"])


# ---- patient matching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("patients, expected", [
    ([], PatientMatch("not_found")),
    ([patient("p1")], PatientMatch("matched", "p1")),
    ([patient("p1"), patient("p1")], PatientMatch("matched", "p1")),
    ([patient("p1"), patient("p2")], PatientMatch("ambiguous")),
    ([patient("old", active=False), patient("p2", active=True)], PatientMatch("matched", "p2")),
    ([patient("a", active=False), patient("b", active=False)], PatientMatch("ambiguous")),
])
def test_resolve_patient(patients, expected):
    assert resolve_patient(FakeClient({"Patient": patients}), "urn:oid:1.2", "MRN1") == expected


def test_identifier_search_escapes_separators():
    client = FakeClient({"Patient": []})
    resolve_patient(client, "urn:oid:1.2", "A|B,C")
    resolve_patient(client, None, "MRN1")
    assert ("identifier", r"urn:oid:1.2|A\|B\,C") in client.calls[0][1]
    assert ("identifier", "MRN1") in client.calls[1][1]


# ---- fetch_timeline ----------------------------------------------------------------------------------------


def fetch(client: FakeClient, **kw: Any) -> tuple[Timeline, list[dict[str, Any]]]:
    args = dict(identifier_system="urn:oid:1.2", identifier_value="MRN1", study_time=STUDY, window_days=30,
                resource_types=("Observation", "Condition", "MedicationRequest", "Encounter"))
    args.update(kw)
    return fetch_timeline(client, **args)  # type: ignore[arg-type]


def test_events_outside_the_window_or_of_other_patients_are_dropped():
    inside = obs("in", "2024-05-20T00:00:00Z")
    boundary = obs("edge", (STUDY - timedelta(days=30)).isoformat())
    at_study = obs("now", STUDY.isoformat())
    too_old = obs("old", "2024-04-01T00:00:00Z")
    after = obs("after", "2024-06-01T12:00:01Z")
    foreign = obs("other", "2024-05-21T00:00:00Z", subject="Patient/p2")
    absolute = obs("abs", "2024-05-22T00:00:00Z", subject="http://srv/fhir/Patient/p1/_history/2")
    served = [inside, boundary, at_study, too_old, after, foreign, absolute, inside]
    client = FakeClient({"Patient": [patient("p1")], "Observation": served})
    tl, resources = fetch(client)
    assert tl.status == "ok" and tl.patient_id == "p1"
    assert [r["id"] for r in resources] == ["in", "edge", "now", "abs"]
    assert tl.resource_count == 4
    assert [e.time for e in tl.events] == sorted(e.time for e in tl.events)
    assert len(tl.events) == 4


def test_queries_filter_by_subject_and_observation_date():
    client = FakeClient({"Patient": [patient("p1")]})
    fetch(client, study_time=datetime(2024, 6, 1, 14, 0, 0, 999, tzinfo=timezone(timedelta(hours=2))))
    calls = dict(client.calls)
    assert calls["Observation"] == [("subject", "Patient/p1"), ("date", "ge2024-05-02T12:00:00Z"),
                                    ("date", "le2024-06-01T12:00:00Z")]
    for rtype in ("Condition", "MedicationRequest", "Encounter"):
        assert calls[rtype] == [("subject", "Patient/p1")]
    assert ("identifier", "urn:oid:1.2|MRN1") in calls["Patient"]


def test_only_requested_resource_types_are_fetched():
    client = FakeClient({"Patient": [patient("p1")], "Observation": [obs("o", "2024-05-20")]})
    tl, _ = fetch(client, resource_types=["observation"])
    assert [c[0] for c in client.calls] == ["Patient", "Observation"]
    assert tl.status == "ok"


@pytest.mark.parametrize("patients, status", [([], "no_patient"),
                                              ([patient("a"), patient("b")], "ambiguous_patient"),
                                              ([patient("p1")], "empty")])
def test_status_says_why_there_are_no_events(patients, status):
    client = FakeClient({"Patient": patients, "Observation": [obs("old", "2020-01-01")]})
    tl, resources = fetch(client)
    assert (tl.status, tl.events, resources) == (status, (), [])
    assert tl.patient_id == ("p1" if status == "empty" else None)


def test_unavailable_server_propagates():
    with pytest.raises(FHIRUnavailable):
        fetch(FakeClient({}, fail=FHIRUnavailable("down")))


def test_invalid_arguments():
    client = FakeClient({"Patient": [patient("p1")]})
    with pytest.raises(ValueError, match="timezone-aware"):
        fetch(client, study_time=datetime(2024, 6, 1))
    with pytest.raises(ValueError, match="window_days"):
        fetch(client, window_days=0)
    with pytest.raises(ValueError, match="identifier value"):
        fetch(client, identifier_value="")


# ---- resources of unexpected types (issue 18) --------------------------------------------------------------


def organization(oid: str = "org1") -> dict[str, Any]:
    return {"resourceType": "Organization", "id": oid, "name": "General Hospital",
            "identifier": [{"system": "urn:oid:1.2", "value": "MRN1"}]}


def test_a_non_patient_answering_the_patient_search_is_never_the_patient():
    """An Organization (even one carrying the searched identifier) is not a Patient: no timeline is read
    for it, and it is counted by reason."""
    client = FakeClient({"Patient": [organization()], "Observation": [obs("o", "2024-05-20", subject="Organization/org1")]})
    tl, resources = fetch(client)
    assert (tl.status, tl.patient_id, tl.events, resources) == ("no_patient", None, (), [])
    assert tl.ignored_resources == {"Organization in Patient search": 1}
    assert [c[0] for c in client.calls] == ["Patient"]  # no search for the Organization's events


def test_a_non_patient_beside_the_patient_is_counted_and_the_patient_used():
    client = FakeClient({"Patient": [organization(), patient("p1"), {"resourceType": "<b>x</b>", "id": "z"}],
                         "Observation": [obs("o", "2024-05-20")]})
    tl, _ = fetch(client, resource_types=["observation"])
    assert (tl.status, tl.patient_id) == ("ok", "p1")
    assert tl.ignored_resources == {"Organization in Patient search": 1,
                                    "invalid resourceType in Patient search": 1}


def test_a_patient_without_the_searched_identifier_is_ignored():
    """A server that ignores `identifier` answers with some patient: it is not ours."""
    stranger = {"resourceType": "Patient", "id": "p9", "identifier": [{"system": "urn:oid:1.2", "value": "MRN9"}]}
    other_system = {"resourceType": "Patient", "id": "p8", "identifier": [{"system": "urn:oid:9", "value": "MRN1"}]}
    client = FakeClient({"Patient": [stranger, other_system]})
    tl, _ = fetch(client)
    assert tl.status == "no_patient"
    assert tl.ignored_resources == {"Patient without the searched identifier in Patient search": 2}
    # no system searched (empty issuer mapping): any system with the value matches
    assert resolve_patient(FakeClient({"Patient": [other_system]}), None, "MRN1") == PatientMatch("matched", "p8")


def test_resources_of_types_not_asked_for_give_no_events_and_are_counted():
    cond = {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p1"},
            "code": {"coding": [{"system": codes.SNOMED_CT, "code": "38341003"}]}, "onsetDateTime": "2024-05-20"}
    served = [obs("o", "2024-05-20"), cond, organization(), obs("o2", "2024-05-21")]
    client = FakeClient({"Patient": [patient("p1")], "Observation": served})
    tl, resources = fetch(client, resource_types=["observation"])
    assert [r["id"] for r in resources] == ["o", "o2"]
    assert {e.kind for e in tl.events} == {"observation"} and tl.resource_count == 2
    assert tl.ignored_resources == {"Condition in Observation search": 1, "Organization in Observation search": 1}


def test_extract_events_counts_resources_of_types_not_read():
    """The Bundle reader (training) reads only the card's types and says what it skipped."""
    cond = {"resourceType": "Condition", "id": "c", "code": {"coding": [{"system": codes.SNOMED_CT, "code": "1"}]},
            "onsetDateTime": "2024-05-20"}
    read = extract_events([obs("o", "2024-05-20"), cond, patient("p1"), {"resourceType": 7}],
                          resource_types=["observation"])
    assert [e.code for e in read.events] == ["718-7"]
    assert read.ignored_resources == {"Condition not among the timeline's resource types": 1,
                                      "Patient not among the timeline's resource types": 1,
                                      "invalid resourceType not among the timeline's resource types": 1}


def test_keep_leaves_out_events_no_feature_reads_and_their_resources():
    served = [obs("hb", "2024-05-20"), obs("na", "2024-05-21", code="2951-2", value=140)]
    client = FakeClient({"Patient": [patient("p1")], "Observation": served})
    streamed: list[str] = []
    tl = read_timeline(client, identifier_system="urn:oid:1.2", identifier_value="MRN1",  # type: ignore[arg-type]
                       study_time=STUDY, window_days=30, resource_types=["observation"],
                       keep=lambda e: e.code == "718-7", on_resource=lambda r: streamed.append(r["id"]))
    assert [e.code for e in tl.events] == ["718-7"]
    assert (tl.unused_events, tl.resource_count, streamed) == (1, 1, ["hb"])
    assert Timeline.from_dict(json.loads(json.dumps(tl.to_dict()))).unused_events == 1


def test_events_share_their_strings_and_cap_displays():
    """Memory per event does not grow with repeated codes, and a display cannot be a megabyte."""
    flooded = obs("c", "2024-05-22")
    flooded["code"]["coding"][0]["display"] = "x" * 10_000
    read = extract_events([obs("a", "2024-05-20"), obs("b", "2024-05-21"), flooded])
    a, b, c = read.events
    assert a.code is b.code and a.system is b.system and a.display is b.display
    assert c.display is not None and len(c.display) == MAX_DISPLAY
    assert not hasattr(a, "__dict__")  # slots: no per-event dict
