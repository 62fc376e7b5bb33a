"""One EHR reader for training and serving (fhir/events.py).

The same Bundle goes through both paths and must give the same tensor:
- serving: the `timeline` stage fetches the resources from a (fake) FHIR server, writes timeline.json, and
  `infer` encodes its events (`Timeline.from_dict` -> `encode_timeline`), exactly as the worker does;
- training: `load_cohort` on a cohort folder holding that Bundle, read with `fhir.events.events_from_bundle`.
The Bundle holds the cases the two readers once disagreed on: a lab whose display unit differs from its
UCUM code (and needs converting), a concept whose preferred coding is not the first, a refuted condition,
a contained medication and an R5 encounter class. The unit tests below pin each reading rule.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.events import (
    TimelineEvent,
    events_from_bundle,
    events_from_resource,
    extract_events,
)
from dicom_fusion.fhir.timeline import Timeline
from dicom_fusion.inference.card.model import (
    ANY,
    DEFAULT_TIMELINE,
    ModelCard,
    TimelineFeature,
    TimelineSpec,
    default_card,
)
from dicom_fusion.inference.data.cohort import Cohort, CohortError, load_cohort, read_bundle_events
from dicom_fusion.inference.data.timeline_tensor import TimelineTensor, encode_timeline
from dicom_fusion.inference.synth.generate import MRN_SYSTEM, generate_cohort
from dicom_fusion.service.config import FhirSettings
from dicom_fusion.service.jobs import stages
from dicom_fusion.service.jobs.study_context import StudyFacts

ICD10 = "http://hl7.org/fhir/sid/icd-10"
ATC = "http://www.whocc.no/atc"
VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
GLUCOSE_MG_PER_MMOL = 18.0156  # mg/dL per mmol/L (molar mass 180.156 g/mol)

#: A card whose features name the card's code systems (the preferred ones) and specific codes, so that
#: a wrong coding choice, a refuted condition or a lost medication shows in the tensor.
SPEC = TimelineSpec(
    resource_types=("Observation", "Condition", "MedicationRequest", "Encounter"),
    window_days=730,
    bin_days=30,
    features=(
        TimelineFeature("glucose", "observation", codes.LOINC, "2345-7", "mg/dL", mean=105.0, std=25.0),
        TimelineFeature("crp", "observation", codes.LOINC, "1988-5", "mg/L", mean=6.0, std=8.0),
        TimelineFeature("diabetes", "condition", codes.SNOMED_CT, "73211009", None, mean=0.1, std=0.3),
        TimelineFeature("conditions", "condition", ANY, ANY, None, mean=0.1, std=0.35),
        TimelineFeature("metformin", "medication", codes.RXNORM, "860975", None, mean=0.1, std=0.3),
        TimelineFeature("inpatient", "encounter", codes.V3_ACT_CODE, "IMP", None, mean=0.1, std=0.3),
        TimelineFeature("encounters", "encounter", ANY, ANY, None, mean=0.3, std=0.5),
    ),
)
FEATURE = {f.name: j for j, f in enumerate(SPEC.features)}


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def tricky_resources(pid: str, study: datetime) -> list[dict[str, Any]]:
    """The resources the two readers once read differently, in the bins 1, 2 and 3 months before `study`."""
    subject = {"reference": f"Patient/{pid}"}
    m1, m2, m3 = (study - timedelta(days=d) for d in (40, 70, 100))
    return [
        {"resourceType": "Observation", "id": f"{pid}-glu-mmol", "status": "final", "subject": subject,
         "effectiveDateTime": _ts(m1),
         "code": {"coding": [{"system": "urn:local:lab", "code": "GLU"},
                             {"system": codes.LOINC, "code": "2345-7", "display": "Glucose"}]},
         # display text 'mmol/l', UCUM code 'mmol/L': the model wants mg/dL, so this must be converted
         "valueQuantity": {"value": 5.5, "unit": "mmol/l", "system": codes.UCUM, "code": "mmol/L"}},
        {"resourceType": "Observation", "id": f"{pid}-crp", "status": "final", "subject": subject,
         "effectiveDateTime": _ts(m2),
         "code": {"coding": [{"system": codes.LOINC, "code": "1988-5", "display": "CRP"}]},
         # display text 'mg/dl', UCUM code 'mg/dL', model unit mg/L: 0.8 mg/dL = 8 mg/L
         "valueQuantity": {"value": 0.8, "unit": "mg/dl", "system": codes.UCUM, "code": "mg/dL"}},
        {"resourceType": "Condition", "id": f"{pid}-dm", "subject": subject, "onsetDateTime": _ts(m3),
         "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "confirmed"}]},
         # the card's system (SNOMED CT) is the second coding
         "code": {"coding": [{"system": ICD10, "code": "E14.9"},
                             {"system": codes.SNOMED_CT, "code": "73211009", "display": "Diabetes"}]}},
        {"resourceType": "Condition", "id": f"{pid}-dm-refuted", "subject": subject, "onsetDateTime": _ts(m2),
         "verificationStatus": {"coding": [{"system": VERIFICATION, "code": "refuted"}]},
         "code": {"coding": [{"system": codes.SNOMED_CT, "code": "73211009"}]}},
        {"resourceType": "MedicationRequest", "id": f"{pid}-met", "status": "active", "intent": "order",
         "subject": subject, "authoredOn": _ts(m2),
         "contained": [{"resourceType": "Medication", "id": "med1",
                        "code": {"coding": [{"system": ATC, "code": "A10BA02"},
                                            {"system": codes.RXNORM, "code": "860975"}]}}],
         "medicationReference": {"reference": "#med1"}},
        {"resourceType": "Encounter", "id": f"{pid}-enc-r5", "status": "completed", "subject": subject,
         "period": {"start": _ts(m1)},
         "class": [{"coding": [{"system": codes.V3_ACT_CODE, "code": "IMP", "display": "inpatient"}]}]},
        {"resourceType": "Encounter", "id": f"{pid}-enc-r4", "status": "finished", "subject": subject,
         "period": {"start": _ts(m3)}, "class": {"system": codes.V3_ACT_CODE, "code": "AMB"}},
    ]


# ---- serving and training read one Bundle the same way ------------------------------------------------------


class FakeServer:
    """A FHIR client answering each search with the resources of that type (parameters ignored)."""

    def __init__(self, resources: list[dict[str, Any]]) -> None:
        self.by_type: dict[str, list[dict[str, Any]]] = {}
        for r in resources:
            self.by_type.setdefault(r["resourceType"], []).append(r)

    def search(self, resource_type: str, params: Any) -> Any:
        return iter(self.by_type.get(resource_type, []))


def serve_tensor(tmp: Path, card: ModelCard, resources: list[dict[str, Any]], patient_id: str,
                 study_time: datetime) -> TimelineTensor | None:
    """The tensor the worker feeds the model: the real `timeline` stage, then `infer`'s encoding."""
    job_dir = tmp / "job"
    job_dir.mkdir(parents=True, exist_ok=True)
    facts = StudyFacts(study_uid="1.2.3", study_time=study_time.isoformat(), patient_id=patient_id,
                       issuer="", accession_number="")
    (job_dir / "study.json").write_text(json.dumps(facts.to_dict()))
    rt = SimpleNamespace(
        spool=SimpleNamespace(job_dir=lambda _job_id: job_dir, fsync=False),
        # the synthetic Patients' identifier system: the timeline checks the Patient carries what it searched
        settings=SimpleNamespace(fhir=FhirSettings(base_url="http://fhir.test/r4",
                                                   default_identifier_system=MRN_SYSTEM),
                                 worker=SimpleNamespace(max_retries=3)),
        models=lambda _card_path="": SimpleNamespace(card=card),
        fhir_client=lambda: contextlib.nullcontext(FakeServer(resources)),
    )
    job = SimpleNamespace(job_id=1, attempts=0, created_at=datetime.now(UTC), card_path="")
    stages.timeline(rt, job)  # type: ignore[arg-type]
    record = json.loads((job_dir / "timeline.json").read_text())
    assert record["status"] == "ok", record
    tl = Timeline.from_dict(record["timeline"])  # what `infer` does with timeline.json
    return encode_timeline(tl.events, facts.time, card.timeline)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort whose first patient's Bundle also holds the tricky resources."""
    out = tmp_path_factory.mktemp("cohort")
    patients = generate_cohort(4, out, seed=7, progress=False)
    first = patients[0]
    bundle = json.loads(first.bundle_path.read_text())
    bundle["entry"] += [{"resource": r} for r in tricky_resources(first.fhir_id, first.study_time)]
    first.bundle_path.write_text(json.dumps(bundle))
    rows = list(csv.DictReader((out / "cohort.csv").open()))
    for i, row in enumerate(rows):  # both labels, whatever the seed drew: load_cohort insists
        row["label"] = str(i % 2)
    with (out / "cohort.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


@pytest.fixture(scope="module")
def card(tmp_path_factory: pytest.TempPathFactory) -> ModelCard:
    out = tmp_path_factory.mktemp("card")
    base = default_card(weights=out / "weights.pt", sha256="0" * 64, path=out / "card.toml")
    return dataclasses.replace(base, timeline=SPEC)


@pytest.fixture(scope="module")
def trained_on(cohort_dir: Path, card: ModelCard) -> Cohort:
    return load_cohort(cohort_dir, card, read_events=events_from_bundle, cache=False, progress=False)


def _bundle_resources(path: Path) -> list[dict[str, Any]]:
    return [e["resource"] for e in json.loads(path.read_text())["entry"]]


def test_training_and_serving_give_identical_tensors(cohort_dir: Path, card: ModelCard, trained_on: Cohort,
                                                     tmp_path: Path) -> None:
    for i, record in enumerate(trained_on.records):
        served = serve_tensor(tmp_path / record.patient_id, card, _bundle_resources(record.bundle_path),
                              record.patient_id, record.study_time)
        trained = encode_timeline(trained_on.events[i], record.study_time, card.timeline)
        assert served is not None and trained is not None, record.patient_id
        assert served.length == trained.length, record.patient_id
        np.testing.assert_array_equal(served.values, trained.values, err_msg=record.patient_id)
        np.testing.assert_array_equal(served.mask, trained.mask, err_msg=record.patient_id)
        np.testing.assert_array_equal(served.deltas, trained.deltas, err_msg=record.patient_id)


def test_the_shared_reader_reads_the_tricky_cases_right(trained_on: Cohort) -> None:
    """What the identical tensors hold for the tricky resources (so 'identical' cannot mean 'equally wrong')."""
    record, events = trained_on.records[0], trained_on.events[0]
    tensor = encode_timeline(events, record.study_time, SPEC)
    assert tensor is not None
    row = {d: tensor.length - 1 - d // 30 for d in (40, 70, 100)}  # bin of an event `d` days before the study
    glucose, crp = SPEC.features[FEATURE["glucose"]], SPEC.features[FEATURE["crp"]]
    in_mg_dl = 5.5 * GLUCOSE_MG_PER_MMOL
    assert tensor.mask[row[40], FEATURE["glucose"]] == 1.0
    # the synthetic encounter of that month may add a glucose value of its own: the bin mean covers both
    month = [float(e.value or 0) for e in events
             if e.code == "2345-7" and 30 <= (record.study_time - e.time).days < 60]
    assert any(abs(v - in_mg_dl) < 1e-6 for v in month)
    expected = (np.mean(month) - glucose.mean) / glucose.std
    assert tensor.values[row[40], FEATURE["glucose"]] == pytest.approx(expected, rel=1e-5)
    assert any(e.code == "1988-5" and e.value == pytest.approx(8.0) and getattr(e, "unit", None) == "mg/L"
               for e in events)
    assert tensor.mask[row[70], FEATURE["crp"]] == 1.0 and crp.unit == "mg/L"
    diabetes = SPEC.features[FEATURE["diabetes"]]
    assert tensor.values[row[100], FEATURE["diabetes"]] == pytest.approx((1 - diabetes.mean) / diabetes.std)
    assert tensor.values[row[70], FEATURE["diabetes"]] == pytest.approx((0 - diabetes.mean) / diabetes.std)
    metformin = SPEC.features[FEATURE["metformin"]]
    assert tensor.values[row[70], FEATURE["metformin"]] == pytest.approx((1 - metformin.mean) / metformin.std)
    inpatient = SPEC.features[FEATURE["inpatient"]]
    assert tensor.values[row[40], FEATURE["inpatient"]] == pytest.approx((1 - inpatient.mean) / inpatient.std)


def test_cohort_bundle_that_is_not_a_bundle_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"resourceType": "Patient", "id": "p"}))
    with pytest.raises(CohortError, match="expected a FHIR Bundle.*'Patient'"):
        read_bundle_events(path, SPEC, read_events=events_from_bundle)
    assert read_bundle_events(tmp_path / "missing.json", SPEC, read_events=events_from_bundle) == ()


def test_cohort_reader_passes_the_cards_types_and_units(tmp_path: Path) -> None:
    """The loader hands the card's resource types and feature units to the injected reader."""
    seen: dict[str, Any] = {}

    def reader(bundle: Any, /, *, resource_types: Any, target_units: Any, value_bounds: Any) -> list[TimelineEvent]:
        seen.update(resource_types=tuple(resource_types), target_units=dict(target_units),
                    value_bounds=dict(value_bounds))
        return []

    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection", "entry": []}))
    assert read_bundle_events(path, DEFAULT_TIMELINE, read_events=reader) == ()
    assert seen["resource_types"] == DEFAULT_TIMELINE.resource_types
    assert seen["target_units"] == {"http://loinc.org|2345-7": "mg/dL", "http://loinc.org|4548-4": "%",
                                    "http://loinc.org|1988-5": "mg/L", "http://loinc.org|39156-5": "kg/m2",
                                    "http://loinc.org|8480-6": "mm[Hg]"}
    assert seen["value_bounds"] == DEFAULT_TIMELINE.value_bounds


def test_training_drops_implausible_values_as_serving_does(tmp_path: Path) -> None:
    """A feature's plausible bounds (card `min` / `max`) apply to the training cohort too: a value the timeline
    stage would drop never reaches the model during training either."""
    spec = dataclasses.replace(SPEC, features=tuple(
        dataclasses.replace(f, min=20.0, max=1000.0) if f.name == "glucose" else f for f in SPEC.features))

    def glucose(rid: str, value: float) -> dict[str, Any]:
        return {"resourceType": "Observation", "id": rid, "status": "final",
                "code": {"coding": [{"system": codes.LOINC, "code": "2345-7"}]},
                "effectiveDateTime": "2024-05-01T10:00:00Z",
                "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                  "code": "mg/dL"}}

    resources = [glucose("ok", 110.0), glucose("absurd", 50000.0)]
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                "entry": [{"resource": r} for r in resources]}))
    trained = read_bundle_events(path, spec, read_events=events_from_bundle)
    served = extract_events(resources, resource_types=spec.resource_types, target_units=spec.target_units,
                            value_bounds=spec.value_bounds)
    assert [e.value for e in trained] == [e.value for e in served.events] == [110.0]
    assert served.out_of_range_values == 1


# ---- fhir/events.py, one rule at a time --------------------------------------------------------------------

STUDY = datetime(2024, 6, 1, 12, tzinfo=UTC)


def by_id(rid: str) -> dict[str, Any]:
    return next(r for r in tricky_resources("p1", STUDY) if r["id"] == rid)


def test_the_ucum_code_wins_over_the_display_unit() -> None:
    (glucose,) = events_from_resource(by_id("p1-glu-mmol"))
    assert (glucose.value, glucose.unit) == (5.5, "mmol/L")
    (crp,) = events_from_resource(by_id("p1-crp"))
    assert (crp.value, crp.unit) == (0.8, "mg/dL")
    no_system = {**by_id("p1-crp"), "valueQuantity": {"value": 0.8, "unit": "mg/dl", "code": "mg/dL"}}
    assert events_from_resource(no_system)[0].unit == "mg/dl"  # not declared UCUM: the text is all we trust


def test_values_are_converted_to_the_models_unit_or_dropped_and_counted() -> None:
    units = {f"{codes.LOINC}|2345-7": "mg/dL", f"{codes.LOINC}|1988-5": "mg/L"}
    unitless = {**by_id("p1-crp"), "id": "crp-unitless", "valueQuantity": {"value": 3.0}}
    read = extract_events([by_id("p1-glu-mmol"), by_id("p1-crp"), unitless], target_units=units)
    assert [(e.code, round(e.value or 0, 4), e.unit) for e in read.events] == [
        ("1988-5", 8.0, "mg/L"), ("2345-7", round(5.5 * GLUCOSE_MG_PER_MMOL, 4), "mg/dL")]
    assert read.dropped_values == 1
    assert [r["id"] for r in read.resources] == ["p1-glu-mmol", "p1-crp"]


def test_the_preferred_coding_is_chosen_when_it_is_not_first() -> None:
    (glucose,) = events_from_resource(by_id("p1-glu-mmol"))
    assert (glucose.system, glucose.code) == (codes.LOINC, "2345-7")
    (condition,) = events_from_resource(by_id("p1-dm"))
    assert (condition.system, condition.code, condition.display) == (codes.SNOMED_CT, "73211009", "Diabetes")
    only_icd = {**by_id("p1-dm"), "code": {"coding": [{"system": ICD10, "code": "E14.9"}]}}
    assert events_from_resource(only_icd)[0].code == "E14.9"  # no preferred coding: the first one


@pytest.mark.parametrize("code", ["refuted", "entered-in-error"])
def test_refuted_and_entered_in_error_conditions_are_dropped(code: str) -> None:
    condition = {**by_id("p1-dm"), "verificationStatus": {"coding": [{"system": VERIFICATION, "code": code}]}}
    assert events_from_resource(condition) == []
    assert events_from_resource(by_id("p1-dm-refuted")) == []
    assert len(events_from_resource(by_id("p1-dm"))) == 1  # confirmed stays


def test_a_contained_medication_is_resolved() -> None:
    (med,) = events_from_resource(by_id("p1-met"))
    assert (med.kind, med.system, med.code, med.time) == (
        "medication", codes.RXNORM, "860975", STUDY - timedelta(days=70))
    dangling = {**by_id("p1-met"), "medicationReference": {"reference": "#other"}}
    assert events_from_resource(dangling) == []


@pytest.mark.parametrize("klass", [
    {"system": codes.V3_ACT_CODE, "code": "IMP"},  # R4: a Coding
    [{"coding": [{"system": "urn:local:class", "code": "ward"}]},  # R5: CodeableConcepts, preferred in the 2nd
     {"coding": [{"system": codes.V3_ACT_CODE, "code": "IMP"}]}],
])
def test_encounter_class_r4_coding_and_r5_codeable_concepts(klass: Any) -> None:
    (enc,) = events_from_resource({**by_id("p1-enc-r5"), "class": klass})
    assert (enc.kind, enc.system, enc.code) == ("encounter", codes.V3_ACT_CODE, "IMP")


def test_extraction_windows_filters_types_and_sorts_whatever_the_input_order() -> None:
    resources = tricky_resources("p1", STUDY)
    forward = extract_events(resources)
    backward = extract_events(list(reversed(resources)))
    assert forward.events == backward.events
    assert [e.time for e in forward.events] == sorted(e.time for e in forward.events)
    assert len(forward.events) == 6  # 7 resources, the refuted condition gives none
    window = extract_events(resources, start=STUDY - timedelta(days=80), end=STUDY)
    assert {(STUDY - e.time).days for e in window.events} == {40, 70}
    only = extract_events(resources, resource_types=["condition", "medication"])
    assert {e.kind for e in only.events} == {"condition", "medication"}
    with pytest.raises(ValueError, match="timezone-aware"):
        extract_events(resources, end=datetime(2024, 6, 1))


def test_a_bundle_is_read_like_the_servers_answers() -> None:
    resources = tricky_resources("p1", STUDY)
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": r, "request": {"method": "PUT"}} for r in resources]
              + [{"request": {"method": "DELETE", "url": "Observation/x"}}]}
    assert events_from_bundle(bundle) == extract_events(resources).events
    with pytest.raises(ValueError, match="expected a FHIR Bundle"):
        events_from_bundle({"resourceType": "Observation"})
