"""Small timeline events (a stand-in for fhir.events.TimelineEvent that also allows a naive time, which the
encoder must handle) and a two-feature spec for the encoder's tests (test_timeline_tensor, test_ensemble, test_synth)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dicom_fusion.inference.card.model import LOINC, TimelineFeature, TimelineSpec

STUDY = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SPEC = TimelineSpec(
    resource_types=("Observation", "Condition"),
    window_days=90,
    bin_days=30,
    features=(
        TimelineFeature("glucose", "observation", LOINC, "2345-7", "mg/dL", mean=100.0, std=10.0),
        TimelineFeature("conditions", "condition", "*", "*", None, mean=0.5, std=0.5),
    ),
)


@dataclass(frozen=True)
class Event:
    kind: str
    system: str
    code: str
    time: datetime
    value: float | None = None
    unit: str | None = None


def glucose(days_before: float, value: float, unit: str | None = "mg/dL") -> Event:
    return Event("observation", LOINC, "2345-7", STUDY - timedelta(days=days_before), value, unit)


def condition(days_before: float) -> Event:
    return Event("condition", "http://snomed.info/sct", "44054006", STUDY - timedelta(days=days_before))
