"""The report transaction bundle: content, conditional creates, determinism, R4 validity."""
from __future__ import annotations

import base64
import dataclasses
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import parse_qsl

import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.report import (
    ReportContent,
    ReportFinding,
    build_report_bundle,
    report_identifier,
    validate_resource,
)

SR_UID = "1.2.826.0.1.3680043.8.498.12345"
STUDY_UID = "1.2.826.0.1.3680043.8.498.999"
ISSUED = datetime(2024, 6, 1, 13, 0, tzinfo=UTC)
NORMAL = ReportFinding("17621005", codes.SNOMED_CT, "Normal", 0.12)
PNEUMONIA = ReportFinding("233604007", codes.SNOMED_CT, "Pneumonia", 0.88)


def content(**changes) -> ReportContent:
    base = ReportContent(identifier=SR_UID, patient_id="p1", patient_identifier=("urn:oid:1.2.3", "MRN1"),
                         study_instance_uid=STUDY_UID, accession_number="ACC42",
                         effective=datetime(2024, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=2))),
                         model_name="hybrid-cxr", model_version="1.4.0", probabilities=(NORMAL, PNEUMONIA),
                         finding=PNEUMONIA, image_only=False, image_only_reason=None)
    return dataclasses.replace(base, **changes)


def entries_of(bundle: dict, rtype: str) -> list[dict]:
    return [e for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def report_of(bundle: dict) -> dict:
    (entry,) = entries_of(bundle, "DiagnosticReport")
    return entry["resource"]


def test_bundle_is_a_valid_r4_transaction():
    bundle = build_report_bundle(content(), issued=ISSUED)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "transaction"
    types = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert types == ["Observation"] * 3 + ["DiagnosticReport"]
    for entry in bundle["entry"]:
        assert entry["fullUrl"].startswith("urn:uuid:")
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["url"] == entry["resource"]["resourceType"]


def test_every_entry_is_conditional_on_its_own_identifier():
    bundle = build_report_bundle(content(), issued=ISSUED)
    seen = set()
    for entry in bundle["entry"]:
        (key, value), = parse_qsl(entry["request"]["ifNoneExist"])
        assert key == "identifier"
        ident = entry["resource"]["identifier"][0]
        assert value == f"{ident['system']}|{ident['value']}"
        seen.add(value)
    assert len(seen) == len(bundle["entry"])
    assert report_of(bundle)["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{SR_UID}"}
    assert report_identifier(content()) == ("urn:dicom:uid", f"urn:oid:{SR_UID}")


def test_identifiers_are_deterministic_per_sr_uid():
    a = build_report_bundle(content(), issued=ISSUED)
    b = build_report_bundle(content(), issued=ISSUED + timedelta(hours=1))
    other = build_report_bundle(content(identifier=SR_UID + ".1"), issued=ISSUED)

    def keys(bundle: dict) -> list[str]:
        return [k for e in bundle["entry"] for k in (e["request"]["ifNoneExist"], e["fullUrl"])]

    assert keys(a) == keys(b)
    assert not set(keys(a)) & set(keys(other))


def test_probability_observations():
    bundle = build_report_bundle(content(), issued=ISSUED)
    probs = [e["resource"] for e in entries_of(bundle, "Observation") if "valueQuantity" in e["resource"]]
    assert [(o["code"]["coding"][0]["code"], o["valueQuantity"]["value"]) for o in probs] == [
        ("17621005", 0.12), ("233604007", 0.88)]
    for o in probs:
        assert o["valueQuantity"]["system"] == codes.UCUM and o["valueQuantity"]["code"] == "1"
        assert o["status"] == "final" and o["subject"] == {"reference": "Patient/p1"}
        assert o["effectiveDateTime"] == "2024-06-01T10:00:00Z" and o["issued"] == "2024-06-01T13:00:00Z"
        assert "hybrid-cxr 1.4.0" in o["method"]["text"]


def test_finding_observation_and_report_fields():
    bundle = build_report_bundle(content(), issued=ISSUED)
    observations = [e["resource"] for e in entries_of(bundle, "Observation")]
    (finding,) = [o for o in observations if "valueCodeableConcept" in o]
    assert finding["code"]["coding"][0] == {"system": codes.DCM, "code": "121071", "display": "Finding"}
    assert finding["valueCodeableConcept"]["coding"][0]["code"] == "233604007"

    report = report_of(bundle)
    DiagnosticReport.model_validate(report)
    assert report["status"] == "final"
    assert report["category"][0]["coding"][0] == {"system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                                                  "code": "RAD", "display": "Radiology"}
    assert report["code"]["coding"][0]["system"] == codes.LOINC
    assert report["code"]["coding"][0]["code"] == "18748-4"
    assert report["subject"] == {"reference": "Patient/p1"}
    assert report["effectiveDateTime"] == "2024-06-01T10:00:00Z"
    assert report["issued"] == "2024-06-01T13:00:00Z"
    assert report["conclusionCode"][0]["coding"][0]["code"] == "233604007"
    acsn = {"system": codes.V2_IDENTIFIER_TYPE, "code": "ACSN", "display": "Accession ID"}
    assert {"type": {"coding": [acsn], "text": "Accession ID"}, "value": "ACC42"} in report["identifier"]
    obs_urls = [e["fullUrl"] for e in entries_of(bundle, "Observation")]
    assert [r["reference"] for r in report["result"]] == obs_urls
    assert "imagingStudy" not in report  # linked by post_report, which can ask the server


def test_conclusion_and_summary_name_finding_probability_and_model():
    report = report_of(build_report_bundle(content(), issued=ISSUED))
    assert report["conclusion"] == "Pneumonia (probability 0.88); model hybrid-cxr 1.4.0"
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert report["presentedForm"][0]["contentType"] == "text/plain"
    assert "Pneumonia (probability 0.88)" in text and "Normal 0.12" in text and "hybrid-cxr 1.4.0" in text
    assert report["extension"] == [{"url": codes.IMAGE_ONLY_EXTENSION_URL, "valueBoolean": False}]


def test_an_ensemble_states_its_spread_and_why_it_left_the_decision_open():
    undecided = ReportFinding(codes.INDETERMINATE_FINDING[0], codes.SNOMED_CT, codes.INDETERMINATE_FINDING[1], 0.88)
    why = ("the ensemble's members disagree: the spread of their calibrated probabilities of malignant is 0.21, "
           "above the model's limit of 0.14")
    report = report_of(build_report_bundle(content(
        finding=undecided, indeterminate_reason=why,
        uncertainty="ensemble of 5 networks; spread 0.210 (standard deviation of their calibrated probabilities "
                    "of malignant)"), issued=ISSUED))
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert f"Finding: Indeterminate ({why}; no class decided, a clinician decides)" in text
    assert "Uncertainty: ensemble of 5 networks; spread 0.210" in text
    assert report["conclusion"].startswith(f"Indeterminate ({why}")
    plain = base64.b64decode(report_of(build_report_bundle(content(), issued=ISSUED))["presentedForm"][0]["data"])
    assert b"Uncertainty" not in plain  # a single network says nothing about members


def test_image_only_results_are_flagged():
    report = report_of(build_report_bundle(
        content(image_only=True, image_only_reason="no Patient matched the DICOM PatientID"), issued=ISSUED))
    assert report["conclusion"].endswith("; image-only: no Patient matched the DICOM PatientID")
    assert report["extension"][0]["valueBoolean"] is True
    assert "Image-only: no Patient matched" in base64.b64decode(report["presentedForm"][0]["data"]).decode()


def test_unresolved_patient_is_referenced_by_identifier():
    bundle = build_report_bundle(content(patient_id=None), issued=ISSUED)
    expected = {"type": "Patient", "identifier": {"system": "urn:oid:1.2.3", "value": "MRN1"}}
    assert all(e["resource"]["subject"] == expected for e in bundle["entry"])


def test_no_patient_at_all_omits_subject():
    bundle = build_report_bundle(content(patient_id=None, patient_identifier=None, accession_number=None),
                                 issued=ISSUED)
    assert all("subject" not in e["resource"] for e in bundle["entry"])
    assert len(report_of(bundle)["identifier"]) == 1


@pytest.mark.parametrize("changes, match", [
    (dict(identifier="not-a-uid"), "identifier must be a DICOM UID"),
    (dict(study_instance_uid="1." + "2" * 70), "study_instance_uid"),
    (dict(effective=datetime(2024, 6, 1, 12)), "timezone-aware"),
    (dict(probabilities=()), "probabilities is empty"),
    (dict(probabilities=(NORMAL, NORMAL)), "repeated class codes"),
    (dict(model_version=""), "model_version"),
])
def test_invalid_content_is_rejected(changes, match):
    with pytest.raises(ValueError, match=match):
        content(**changes)


def test_finding_probability_range_is_checked():
    with pytest.raises(ValueError, match="0..1"):
        ReportFinding("1", codes.SNOMED_CT, "x", 1.2)
    with pytest.raises(ValueError, match="code"):
        ReportFinding("", codes.SNOMED_CT, "x", 0.5)


def test_invalid_generated_resource_names_the_element_path():
    with pytest.raises(ValueError, match=r"DiagnosticReport\.conclusionCode\[0\]\.coding\[0\]\.system"):
        validate_resource({"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "x"},
                           "conclusionCode": [{"coding": [{"system": 5, "code": "x"}]}]})
    with pytest.raises(ValueError, match=r"Observation\.valueQuantity\.value"):
        validate_resource({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                           "valueQuantity": {"value": "high"}})
    with pytest.raises(ValueError, match="resourceType"):
        validate_resource({"status": "final"})
