"""EHR timeline extraction: resolve the study's patient on the FHIR server and fetch the events before it.

The model's timeline encoder wants plain typed events (kind, code, time, value) from a window that ends at
the study; this module turns Observations, Conditions, MedicationRequests and Encounters into exactly that
and nothing more. Servers differ in which search parameters they honour, so every server-side filter is
repeated client side: the time window (a server may ignore `date`) and the subject (a server that ignored
`subject` would otherwise hand us other patients' data). Numeric values are brought to the units the model
expects (`target_units`, see `units.py`); a value that cannot be converted is dropped and counted.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast, get_args

from dicom_fusion.fhir import codes, units
from dicom_fusion.fhir.client import FhirClient

log = logging.getLogger(__name__)

EventKind = Literal["observation", "condition", "medication", "encounter"]
TimelineStatus = Literal["ok", "no_patient", "ambiguous_patient", "empty", "unavailable"]
MatchStatus = Literal["matched", "not_found", "ambiguous"]

#: FHIR resource type -> event kind. Model cards may name either; both are accepted.
RESOURCE_KINDS: dict[str, EventKind] = {
    "Observation": "observation",
    "Condition": "condition",
    "MedicationRequest": "medication",
    "Encounter": "encounter",
}
#: How many Patient matches we look at: enough to see a merged (inactive) duplicate beside the live record.
_PATIENT_PROBE = 10


@dataclass(frozen=True)
class TimelineEvent:
    """One coded, timed EHR fact. `time` is tz-aware UTC; `value` is None for non-numeric events."""

    kind: str
    system: str
    code: str
    time: datetime
    value: float | None = None
    unit: str | None = None
    display: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in RESOURCE_KINDS.values():
            raise ValueError(f"TimelineEvent.kind must be one of {sorted(RESOURCE_KINDS.values())}, "
                             f"got {self.kind!r}")
        if self.time.tzinfo is None:
            raise ValueError("TimelineEvent.time must be timezone-aware")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "system": self.system, "code": self.code, "time": _iso(self.time),
                "value": self.value, "unit": self.unit, "display": self.display}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TimelineEvent:
        time = parse_fhir_datetime(str(data["time"]))
        if time is None:
            raise ValueError(f"TimelineEvent.time {data['time']!r} is not an ISO date-time")
        value = data.get("value")
        return cls(kind=str(data["kind"]), system=str(data["system"]), code=str(data["code"]), time=time,
                   value=None if value is None else float(value), unit=data.get("unit"),
                   display=data.get("display"))


@dataclass(frozen=True)
class Timeline:
    """The patient's events in the window before the study, and why there are none when there are none.

    `resource_count` counts the FHIR resources that contributed at least one event; `dropped_values`
    counts values left out because their unit could not be converted to the model's (see `units.py`).
    """

    status: TimelineStatus
    patient_id: str | None
    events: tuple[TimelineEvent, ...] = ()
    resource_count: int = 0
    dropped_values: int = 0

    def __post_init__(self) -> None:
        if self.status not in get_args(TimelineStatus):
            raise ValueError(f"Timeline.status must be one of {get_args(TimelineStatus)}, "
                             f"got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "patient_id": self.patient_id, "resource_count": self.resource_count,
                "dropped_values": self.dropped_values, "events": [e.to_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        return cls(status=cast(TimelineStatus, data["status"]), patient_id=data.get("patient_id"),
                   events=tuple(TimelineEvent.from_dict(e) for e in data.get("events") or ()),
                   resource_count=int(data.get("resource_count", 0)),
                   dropped_values=int(data.get("dropped_values", 0)))


@dataclass(frozen=True)
class PatientMatch:
    """Result of looking a DICOM patient up by identifier: exactly one live Patient, none, or several."""

    status: MatchStatus
    patient_id: str | None = None


def resolve_patient(client: FhirClient, system: str | None, value: str) -> PatientMatch:
    """Find the Patient with identifier `system|value` (any system when `system` is empty).

    Several matches are resolved only when exactly one of them is active (a merged duplicate is marked
    `active: false`); otherwise the match is ambiguous and no timeline is used — guessing would feed one
    patient's history into another patient's report.
    """
    if not value:
        raise ValueError("resolve_patient needs a non-empty identifier value (DICOM PatientID)")
    token = f"{_escape(system)}|{_escape(value)}" if system else _escape(value)
    found = itertools.islice(client.search("Patient", {"identifier": token, "_count": str(_PATIENT_PROBE)}),
                             _PATIENT_PROBE)
    patients = {str(p["id"]): p for p in found if p.get("id")}
    if not patients:
        return PatientMatch("not_found")
    if len(patients) == 1:
        return PatientMatch("matched", next(iter(patients)))
    active = [pid for pid, p in patients.items() if p.get("active") is not False]
    if len(active) == 1:
        return PatientMatch("matched", active[0])
    log.warning("patient lookup matched %d Patient resources (%d active); not using a timeline",
                len(patients), len(active))
    return PatientMatch("ambiguous")


def fetch_timeline(client: FhirClient, *, identifier_system: str | None, identifier_value: str,
                   study_time: datetime, window_days: int, resource_types: Sequence[str],
                   target_units: Mapping[str, str] | None = None,
                   elements: bool = False) -> tuple[Timeline, list[dict[str, Any]]]:
    """Resolve the patient and return its events in [study_time - window_days, study_time].

    `target_units` maps `system|code` (e.g. `http://loinc.org|2345-7`) to the UCUM unit the model expects:
    numeric values of those codes are converted to it (`units.convert`), and values whose unit cannot be
    converted — or that carry no unit — are dropped and counted in `Timeline.dropped_values`, never passed
    on mis-scaled. `elements=True` asks the server for only the elements the extraction reads
    (`_elements`), which shrinks the pages; the returned resources are then the subsets the server sent.

    Returns the timeline and the raw resources that contributed events (for audit storage). `FHIRError`s
    (e.g. `FHIRUnavailable`) propagate: whether to retry or degrade to image-only is the caller's call.
    """
    types = normalise_resource_types(resource_types)
    if window_days <= 0:
        raise ValueError(f"window_days must be positive, got {window_days}")
    if study_time.tzinfo is None:
        raise ValueError("study_time must be timezone-aware; attach the site's timezone (DICOM "
                         "TimezoneOffsetFromUTC or the configured default) before fetching the timeline")
    end = study_time.astimezone(UTC)
    start = end - timedelta(days=window_days)

    match = resolve_patient(client, identifier_system, identifier_value)
    if match.status == "not_found":
        return Timeline("no_patient", None), []
    if match.status == "ambiguous" or match.patient_id is None:
        return Timeline("ambiguous_patient", None), []
    patient_id = match.patient_id

    units = _UnitNormaliser(target_units or {})
    events: list[TimelineEvent] = []
    used: list[dict[str, Any]] = []
    for rtype in types:
        seen: set[str] = set()
        fetched = foreign = kept = 0
        query = _query(rtype, patient_id, start, end)
        if elements:
            query.append(("_elements", ",".join(_ELEMENTS[rtype])))
        for res in client.search(rtype, query):
            rid = str(res.get("id", ""))
            if rid in seen:  # offset paging can repeat a resource when data changes between pages
                continue
            seen.add(rid)
            fetched += 1
            if not _is_subject(res, patient_id):
                foreign += 1
                continue
            in_window = units.apply(e for e in events_from_resource(res) if start <= e.time <= end)
            if in_window:
                events.extend(in_window)
                used.append(res)
                kept += 1
        if foreign:
            log.warning("%s search returned %d resource(s) of other subjects; the server may ignore the "
                        "'subject' parameter — dropped them", rtype, foreign)
        log.info("timeline %s: %d fetched, %d in window", rtype, fetched, kept)
    units.warn()
    events.sort(key=lambda e: (e.time, e.kind, e.system, e.code))
    status: TimelineStatus = "ok" if events else "empty"
    log.info("timeline: %s, %d events from %d resources", status, len(events), len(used))
    return Timeline(status, patient_id, tuple(events), len(used), units.dropped_total), used


def normalise_resource_types(resource_types: Iterable[str]) -> tuple[str, ...]:
    """Map model-card names ('Observation' or 'observation', 'medication' or 'MedicationRequest') to FHIR
    resource types, keeping order and dropping repeats."""
    lookup = {t.lower(): t for t in RESOURCE_KINDS} | {k: t for t, k in RESOURCE_KINDS.items()}
    out: list[str] = []
    for name in resource_types:
        rtype = lookup.get(str(name).strip().lower())
        if rtype is None:
            raise ValueError(f"Unsupported timeline resource type {name!r}; supported: "
                             f"{', '.join(RESOURCE_KINDS)}")
        if rtype not in out:
            out.append(rtype)
    return tuple(out)


def events_from_resource(resource: dict[str, Any]) -> list[TimelineEvent]:
    """The timeline events one FHIR resource contributes (no window applied); [] for other types,
    entered-in-error records and records without a code or a time.

    Public so that offline data (e.g. a synthetic cohort's transaction bundle) is read the same way as a
    server's answers.
    """
    extract = _EXTRACTORS.get(str(resource.get("resourceType")))
    return extract(resource) if extract else []


def parse_fhir_datetime(value: str | None) -> datetime | None:
    """Parse a FHIR date / dateTime / instant to tz-aware UTC.

    Partial dates mean their first instant (2021 -> 2021-01-01T00:00Z, date-only -> midnight UTC); a time
    without an offset (invalid FHIR, seen in the wild) is taken as UTC. Returns None for unparseable input.
    """
    if not value:
        return None
    m = _DATE_RE.match(value.strip())
    if not m:
        return None
    year, month, day, rest = m.group("y"), m.group("m"), m.group("d"), m.group("t")
    try:
        if rest is None:
            dt = datetime(int(year), int(month or 1), int(day or 1), tzinfo=UTC)
        else:
            dt = datetime.fromisoformat(f"{year}-{month}-{day}T{rest}")
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
    except ValueError:
        return None
    return dt.astimezone(UTC)


# ---- units -----------------------------------------------------------------------------------------------


class _UnitNormaliser:
    """Converts valued events of the targeted codes to the target unit and counts what it must drop."""

    def __init__(self, target_units: Mapping[str, str]) -> None:
        self.targets = dict(target_units)
        self.dropped: Counter[tuple[str, str]] = Counter()  # (system|code, unit as sent) -> count

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def apply(self, events: Iterable[TimelineEvent]) -> list[TimelineEvent]:
        out: list[TimelineEvent] = []
        for e in events:
            key = f"{e.system}|{e.code}"
            target = self.targets.get(key)
            if target is None or e.value is None:
                out.append(e)
                continue
            value = units.convert(e.value, e.unit, target, system=e.system, code=e.code)
            if value is None or not math.isfinite(value):
                self.dropped[(key, e.unit or "")] += 1
                continue
            out.append(dataclasses.replace(e, value=value, unit=target))
        return out

    def warn(self) -> None:
        if not self.dropped:
            return
        detail = ", ".join(f"{key} in {unit or 'no unit'!r} ×{n} (model expects {self.targets[key]!r})"
                           for (key, unit), n in sorted(self.dropped.items()))
        log.warning("timeline: dropped %d value(s) whose unit cannot be converted to the model's: %s. "
                    "Add the unit to dicom_fusion.fhir.units if it is convertible, or fix the source system",
                    self.dropped_total, detail)


# ---- queries ---------------------------------------------------------------------------------------------

#: What `events_from_resource` reads, per type, for `_elements`. Choice elements are listed by their JSON
#: names and their base name (servers differ in which they accept); `subject` is needed for the subject check.
_ELEMENTS: dict[str, tuple[str, ...]] = {
    "Observation": ("status", "subject", "code", "effective", "effectiveDateTime", "effectiveInstant",
                    "effectivePeriod", "value", "valueQuantity", "valueInteger", "component"),
    "Condition": ("subject", "code", "verificationStatus", "onset", "onsetDateTime", "onsetPeriod",
                  "recordedDate"),
    "MedicationRequest": ("status", "subject", "authoredOn", "medication", "medicationCodeableConcept",
                          "medicationReference", "contained"),
    "Encounter": ("status", "subject", "class", "period"),
}

_DATE_RE = re.compile(r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<t>\d{2}:\d{2}.*))?)?)?$")


def _query(rtype: str, patient_id: str, start: datetime, end: datetime) -> list[tuple[str, str]]:
    query = [("subject", f"Patient/{patient_id}")]
    if rtype == "Observation":  # the one date parameter every server supports the same way
        # whole seconds: 'ge' floors and 'le' covers its whole second, so the window is never narrowed
        query += [("date", f"ge{_iso(start.replace(microsecond=0))}"),
                  ("date", f"le{_iso(end.replace(microsecond=0))}")]
    return query


def _escape(value: str | None) -> str:
    """Escape FHIR search separators in a token part (`\\`, `|`, `,`, `$`)."""
    return re.sub(r"([\\|,$])", r"\\\1", value or "")


def _is_subject(resource: dict[str, Any], patient_id: str) -> bool:
    ref = (resource.get("subject") or {}).get("reference") or ""
    ref = ref.split("/_history/")[0]
    return ref == f"Patient/{patient_id}" or ref.endswith(f"/Patient/{patient_id}")


# ---- resource -> events ----------------------------------------------------------------------------------

def _pick_coding(concept: Any, preferred: str) -> tuple[str, str, str | None] | None:
    """(system, code, display) of the coding in the preferred system, else of the first coded one."""
    if not isinstance(concept, dict):
        return None
    codings = [c for c in concept.get("coding") or [] if isinstance(c, dict) and c.get("code")]
    if not codings:
        return None
    best = next((c for c in codings if c.get("system") == preferred), codings[0])
    return str(best.get("system") or ""), str(best["code"]), best.get("display") or concept.get("text")


def _quantity(element: dict[str, Any]) -> tuple[float | None, str | None]:
    q = element.get("valueQuantity")
    if isinstance(q, dict):
        number = q.get("value")
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            # the UCUM code is the machine-readable unit; `unit` is display text and only a fallback
            ucum = q.get("code") if q.get("system") == codes.UCUM else None
            return float(number), ucum or q.get("unit") or q.get("code")
    v = element.get("valueInteger")
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v), None
    return None, None


def _first_time(*values: Any) -> datetime | None:
    for v in values:
        t = parse_fhir_datetime(v) if isinstance(v, str) else None
        if t is not None:
            return t
    return None


def _observation_events(res: dict[str, Any]) -> list[TimelineEvent]:
    """One event for the Observation's own value, one per valued component (e.g. systolic / diastolic)."""
    if res.get("status") == "entered-in-error":
        return []
    time = _first_time(res.get("effectiveDateTime"), res.get("effectiveInstant"),
                       (res.get("effectivePeriod") or {}).get("start"))
    if time is None:
        return []
    events: list[TimelineEvent] = []
    components = [c for c in res.get("component") or [] if isinstance(c, dict)]
    value, unit = _quantity(res)
    coding = _pick_coding(res.get("code"), codes.LOINC)
    if coding and (value is not None or not components):
        events.append(TimelineEvent("observation", coding[0], coding[1], time, value, unit, coding[2]))
    for comp in components:
        cc = _pick_coding(comp.get("code"), codes.LOINC)
        if cc:
            cv, cu = _quantity(comp)
            events.append(TimelineEvent("observation", cc[0], cc[1], time, cv, cu, cc[2]))
    return events


def _condition_events(res: dict[str, Any]) -> list[TimelineEvent]:
    verification = _pick_coding(res.get("verificationStatus"), "")
    if verification and verification[1] in ("entered-in-error", "refuted"):
        return []
    time = _first_time(res.get("onsetDateTime"), (res.get("onsetPeriod") or {}).get("start"),
                       res.get("recordedDate"))
    coding = _pick_coding(res.get("code"), codes.SNOMED_CT)
    if time is None or coding is None:
        return []
    return [TimelineEvent("condition", coding[0], coding[1], time, None, None, coding[2])]


def _medication_events(res: dict[str, Any]) -> list[TimelineEvent]:
    if res.get("status") == "entered-in-error":
        return []
    concept = res.get("medicationCodeableConcept")
    ref = (res.get("medicationReference") or {}).get("reference") or ""
    if concept is None and ref.startswith("#"):  # contained Medication
        contained = [c for c in res.get("contained") or [] if isinstance(c, dict)]
        med = next((c for c in contained if c.get("id") == ref[1:]), {})
        concept = med.get("code")
    time = _first_time(res.get("authoredOn"))
    coding = _pick_coding(concept, codes.RXNORM)
    if time is None or coding is None:
        return []
    return [TimelineEvent("medication", coding[0], coding[1], time, None, None, coding[2])]


def _encounter_events(res: dict[str, Any]) -> list[TimelineEvent]:
    if res.get("status") in ("entered-in-error", "cancelled"):
        return []
    klass = res.get("class")
    if isinstance(klass, list):  # R5 shape: list of CodeableConcept
        coding = next((c for c in (_pick_coding(k, codes.V3_ACT_CODE) for k in klass) if c), None)
    elif isinstance(klass, dict):  # R4: a single Coding
        coding = _pick_coding({"coding": [klass]}, codes.V3_ACT_CODE)
    else:
        coding = None
    time = _first_time((res.get("period") or {}).get("start"))
    if time is None or coding is None:
        return []
    return [TimelineEvent("encounter", coding[0], coding[1], time, None, None, coding[2])]


_EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[TimelineEvent]]] = {
    "Observation": _observation_events,
    "Condition": _condition_events,
    "MedicationRequest": _medication_events,
    "Encounter": _encounter_events,
}


def _iso(dt: datetime) -> str:
    """UTC ISO-8601 with 'Z', seconds precision unless sub-second detail is present."""
    dt = dt.astimezone(UTC)
    text = dt.isoformat(timespec="microseconds" if dt.microsecond else "seconds")
    return text.replace("+00:00", "Z")
