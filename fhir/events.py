"""FHIR resources -> the typed timeline events the model reads: the one EHR reader of the project.

Serving (`timeline.fetch_timeline`, resources from a FHIR server) and training (the cohort loader, one
Bundle per patient on disk, wired in by the service) both call `extract_events`, so the model is trained on
exactly what it is later fed. Before this module existed training had its own reader, and the two drifted
(display unit before the UCUM code, first coding instead of the preferred one, refuted conditions kept,
contained medications and R5 encounter classes lost) — a model trained that way sees other numbers at
serving time than it learnt from. Keep every reading rule here; nothing else parses clinical resources.

Pure functions, no I/O: what talks to the server (patient lookup, search, paging, the subject check) lives
in `timeline.py`. Reading rules:

- time: Observation effective[x] (dateTime, instant, period start), Condition onset (dateTime, period
  start) then recordedDate, MedicationRequest authoredOn, Encounter period.start; partial dates mean their
  first instant, everything is tz-aware UTC (`parse_fhir_datetime`);
- code: the coding in the kind's preferred system (`PREFERRED_SYSTEMS`: LOINC for observations, SNOMED CT
  for conditions, RxNorm for medications, v3 ActCode for encounter classes), else the first coded one;
- value and unit: valueQuantity / valueInteger, the Observation's own and each component's; the unit is
  the UCUM code when the quantity says it is UCUM, the display text `unit` only as a fallback; values of the
  codes in `target_units` are converted to the model's unit (`units.convert`) or dropped and counted,
  never passed on mis-scaled; values outside the model card's plausible bounds (`value_bounds`, in the
  target unit) and values no clinical quantity reaches (|v| > `MAX_MAGNITUDE`, e.g. 1e308, which would
  overflow the model's float32 tensors) are dropped and counted too;
- left out: entered-in-error records of every type, refuted conditions, cancelled encounters, records
  without a code or a time;
- MedicationRequest.medicationReference to a `#contained` Medication reads that Medication's code;
  Encounter.class is read as an R4 Coding or an R5 list of CodeableConcepts;
- resources of a type that was not asked for are not read, and counted by type (`ignored_resources`).

Memory: `EventReader` reads one resource at a time and keeps only events — never the resources — and,
given `keep` (the model card's features), only the events the model reads; strings repeated across events
(systems, codes, units, displays) are stored once. A timeline of 200 000 Observations thus costs the
events the model needs, not the JSON the server sent (README "Reliability").
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal

from dicom_fusion.fhir import codes, units

log = logging.getLogger(__name__)

EventKind = Literal["observation", "condition", "medication", "encounter"]

#: FHIR resource type -> event kind. Model cards may name either; both are accepted.
RESOURCE_KINDS: Final[dict[str, EventKind]] = {
    "Observation": "observation",
    "Condition": "condition",
    "MedicationRequest": "medication",
    "Encounter": "encounter",
}

#: Event kind -> the code system whose coding is chosen when a concept carries several codings. These are
#: the systems model cards code their features in; a coding in another system is used only when the
#: concept has none in the preferred one.
PREFERRED_SYSTEMS: Final[dict[str, str]] = {
    "observation": codes.LOINC,
    "condition": codes.SNOMED_CT,
    "medication": codes.RXNORM,
    "encounter": codes.V3_ACT_CODE,
}

#: What the extraction reads, per resource type, for a search's `_elements`. Choice elements are listed by
#: their JSON names and their base name (servers differ in which they accept); `subject` is read by the
#: server side's subject check.
READ_ELEMENTS: Final[dict[str, tuple[str, ...]]] = {
    "Observation": ("status", "subject", "code", "effective", "effectiveDateTime", "effectiveInstant",
                    "effectivePeriod", "value", "valueQuantity", "valueInteger", "component"),
    "Condition": ("subject", "code", "verificationStatus", "onset", "onsetDateTime", "onsetPeriod",
                  "recordedDate"),
    "MedicationRequest": ("status", "subject", "authoredOn", "medication", "medicationCodeableConcept",
                          "medicationReference", "contained"),
    "Encounter": ("status", "subject", "class", "period"),
}

#: Largest magnitude a value may have, whatever its code and unit: far above any clinical quantity (cell
#: counts per litre reach ~1e13), far below what overflows the model's float32 tensors once scaled (~3e38).
MAX_MAGNITUDE: Final = 1e18

#: `system|code` -> (min, max) plausible value in the target unit; either side may be None (open).
ValueBounds = Mapping[str, tuple[float | None, float | None]]

#: Condition.verificationStatus codes that mean "this patient does not have it": such a record is no fact.
_NOT_A_DIAGNOSIS: Final = ("entered-in-error", "refuted")

#: Longest display text kept on an event (the model reads codes; a display only labels them in the audit).
MAX_DISPLAY: Final = 200

#: Which events to keep (e.g. those a model card's features read); None keeps every event.
EventFilter = Callable[["TimelineEvent"], bool]

_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")


@dataclass(frozen=True, slots=True)
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
        return {"kind": self.kind, "system": self.system, "code": self.code, "time": fhir_instant(self.time),
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
class EventExtraction:
    """What `extract_events` read: the events (oldest first), the resources that contributed at least one,
    how many values were dropped because their unit cannot be converted to the model's, how many because
    they are outside the plausible bounds (or `MAX_MAGNITUDE`), how many events no feature reads (`keep`),
    and by reason the resources that were not read (a type not asked for)."""

    events: tuple[TimelineEvent, ...]
    resources: tuple[dict[str, Any], ...]
    dropped_values: int = 0
    out_of_range_values: int = 0
    unused_events: int = 0
    ignored_resources: Mapping[str, int] = dataclasses.field(default_factory=dict)


class EventReader:
    """`extract_events` one resource at a time, keeping the events and counts, never the resources.

    `add(resource)` reads one resource and says whether it contributed a kept event (the caller decides
    whether to keep or stream the resource itself); `result()` returns the events read so far, sorted.
    Arguments as for `extract_events`, plus `keep`: events it rejects (no model feature reads them) are
    counted in `unused_events` and not kept.
    """

    def __init__(self, *, resource_types: Iterable[str] | None = None,
                 target_units: Mapping[str, str] | None = None, value_bounds: ValueBounds | None = None,
                 start: datetime | None = None, end: datetime | None = None,
                 keep: EventFilter | None = None) -> None:
        for name, bound in (("start", start), ("end", end)):
            if bound is not None and bound.tzinfo is None:
                raise ValueError(f"extract_events {name} must be timezone-aware (UTC), got a naive datetime")
        self._types = set(normalise_resource_types(resource_types)) if resource_types is not None else None
        self._normaliser = _UnitNormaliser(target_units or {}, value_bounds or {})
        self._start, self._end, self._keep = start, end, keep
        self._events: list[TimelineEvent] = []
        self._strings: dict[str, str] = {}
        self.unused_events = 0
        self.ignored: Counter[str] = Counter()

    def add(self, resource: Mapping[str, Any]) -> bool:
        rtype = resource.get("resourceType")
        if self._types is not None and rtype not in self._types:
            shown = rtype if isinstance(rtype, str) and _TYPE_RE.match(rtype) else "invalid resourceType"
            self.ignored[f"{shown} not among the timeline's resource types"] += 1
            return False
        read = (e for e in events_from_resource(resource)
                if (self._start is None or self._start <= e.time) and (self._end is None or e.time <= self._end))
        kept = False
        for event in self._normaliser.apply(read):
            if self._keep is not None and not self._keep(event):
                self.unused_events += 1
                continue
            self._events.append(self._shared(event))
            kept = True
        return kept

    def _shared(self, e: TimelineEvent) -> TimelineEvent:
        """The event with its strings shared with earlier events' equal strings (one copy per distinct
        system, code, unit and display, not one per event)."""
        s = self._strings
        display = e.display[:MAX_DISPLAY] if e.display is not None else None
        return TimelineEvent(e.kind, s.setdefault(e.system, e.system), s.setdefault(e.code, e.code), e.time,
                             e.value, None if e.unit is None else s.setdefault(e.unit, e.unit),
                             None if display is None else s.setdefault(display, display))

    def result(self) -> EventExtraction:
        """The events read so far (oldest first) and the counts; logs one warning per kind of drop."""
        self._normaliser.warn()
        self._events.sort(key=lambda e: (e.time, e.kind, e.system, e.code))
        return EventExtraction(tuple(self._events), (), self._normaliser.dropped_total,
                               self._normaliser.out_of_range_total, self.unused_events, dict(self.ignored))


def extract_events(resources: Iterable[dict[str, Any]], *,
                   resource_types: Iterable[str] | None = None,
                   target_units: Mapping[str, str] | None = None,
                   value_bounds: ValueBounds | None = None,
                   start: datetime | None = None, end: datetime | None = None,
                   keep: EventFilter | None = None) -> EventExtraction:
    """The timeline events of `resources`, read by the rules of this module — the one reader training and
    serving share.

    `resource_types` (model-card names, see `normalise_resource_types`) limits the types read; None reads
    all four. `target_units` maps `system|code` (e.g. `http://loinc.org|2345-7`) to the UCUM unit the model
    expects: values of those codes are converted to it, and values that cannot be converted — or carry no
    unit — are dropped and counted. `value_bounds` maps `system|code` to its plausible (min, max) in the
    target unit (the model card's feature bounds): values outside, and any value beyond `MAX_MAGNITUDE`, are
    dropped and counted. `start`/`end` (tz-aware, both included) keep only events in that window;
    None leaves that side open. Events are sorted by (time, kind, system, code), so equal input gives equal
    output whatever order the server or the Bundle listed the resources in. Resources of other types are
    not read and counted by type in `ignored_resources`; `keep` (e.g. "a model feature reads it") leaves
    out, and counts, the events it rejects. This keeps every contributing resource: a caller that must not
    (a big timeline) uses `EventReader` and streams the resources elsewhere.
    """
    reader = EventReader(resource_types=resource_types, target_units=target_units, value_bounds=value_bounds,
                         start=start, end=end, keep=keep)
    used = [res for res in resources if reader.add(res)]
    return dataclasses.replace(reader.result(), resources=tuple(used))


def events_from_bundle(bundle: Mapping[str, Any], /, *,
                       resource_types: Iterable[str] | None = None,
                       target_units: Mapping[str, str] | None = None,
                       value_bounds: ValueBounds | None = None) -> tuple[TimelineEvent, ...]:
    """The timeline events of a FHIR Bundle's entries (any Bundle type: transaction, collection, searchset).

    This is the reader a training cohort is loaded with (`inference.data.cohort.load_cohort(...,
    read_events=events_from_bundle)`), so a patient's exported Bundle gives the events the timeline stage
    would get from the server. No window is applied: the tensor encoder windows by the study time.
    """
    if not isinstance(bundle, Mapping) or bundle.get("resourceType") != "Bundle":
        got = bundle.get("resourceType") if isinstance(bundle, Mapping) else type(bundle).__name__
        raise ValueError(f"expected a FHIR Bundle (resourceType 'Bundle'), got {got!r}; export the patient's "
                         "resources as one Bundle")
    entries = [e for e in bundle.get("entry") or [] if isinstance(e, dict)]
    resources = (e["resource"] for e in entries if isinstance(e.get("resource"), dict))
    return extract_events(resources, resource_types=resource_types, target_units=target_units,
                          value_bounds=value_bounds).events


def events_from_resource(resource: Mapping[str, Any]) -> list[TimelineEvent]:
    """The timeline events one FHIR resource contributes as sent (no window, no unit conversion); [] for
    other types, entered-in-error and refuted records, and records without a code or a time."""
    extract = _EXTRACTORS.get(str(resource.get("resourceType")))
    return extract(resource) if extract else []


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


def fhir_instant(dt: datetime) -> str:
    """UTC ISO-8601 with 'Z', seconds precision unless sub-second detail is present (FHIR instant)."""
    dt = dt.astimezone(UTC)
    text = dt.isoformat(timespec="microseconds" if dt.microsecond else "seconds")
    return text.replace("+00:00", "Z")


# ---- units -----------------------------------------------------------------------------------------------


class _UnitNormaliser:
    """Converts valued events of the targeted codes to the target unit, checks values against the plausible
    bounds, and counts what it must drop."""

    def __init__(self, target_units: Mapping[str, str], value_bounds: ValueBounds) -> None:
        self.targets = dict(target_units)
        self.bounds = dict(value_bounds)
        self.dropped: Counter[tuple[str, str]] = Counter()  # (system|code, unit as sent) -> count
        self.out_of_range: Counter[str] = Counter()  # system|code -> count

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def out_of_range_total(self) -> int:
        return sum(self.out_of_range.values())

    def apply(self, events: Iterable[TimelineEvent]) -> Iterator[TimelineEvent]:
        for e in events:
            if e.value is None:
                yield e
                continue
            key = f"{e.system}|{e.code}"
            if not math.isfinite(e.value) or abs(e.value) > MAX_MAGNITUDE:
                self.out_of_range[key] += 1
                continue
            target = self.targets.get(key)
            if target is not None:
                value = units.convert(e.value, e.unit, target, system=e.system, code=e.code)
                if value is None or not math.isfinite(value):
                    self.dropped[(key, e.unit or "")] += 1
                    continue
                e = dataclasses.replace(e, value=value, unit=target)
            low, high = self.bounds.get(key, (None, None))
            if (low is not None and e.value < low) or (high is not None and e.value > high):
                self.out_of_range[key] += 1
                continue
            yield e

    def warn(self) -> None:
        """One warning per kind of drop, naming the model's codes, units and counts (never values or
        patients). Only codes the card names are spelt out — a code the server made up could carry
        anything — and at most `_WARN_DETAIL` of them, so a flood of bad values makes one short line."""
        if self.dropped:
            by_count = sorted(self.dropped.items(), key=lambda item: (-item[1], item[0]))
            detail = ", ".join(f"{key} in {_shown_unit(unit)} ×{n} (model expects {self.targets[key]!r})"
                               for (key, unit), n in by_count[:_WARN_DETAIL])
            more = f" and {len(by_count) - _WARN_DETAIL} other unit(s)" if len(by_count) > _WARN_DETAIL else ""
            log.warning("timeline: dropped %d value(s) whose unit cannot be converted to the model's: %s%s. "
                        "Add the unit to dicom_fusion.fhir.units if it is convertible, or fix the source "
                        "system", self.dropped_total, detail, more)
        if self.out_of_range:
            known = sorted((k, n) for k, n in self.out_of_range.items() if k in self.bounds or k in self.targets)
            other = self.out_of_range_total - sum(n for _, n in known)
            parts = [f"{key} ×{n}" for key, n in known[:_WARN_DETAIL]]
            if other:
                parts.append(f"codes the model does not read ×{other}")
            log.warning("timeline: dropped %d value(s) outside the plausible range (the model card's feature "
                        "min/max, or beyond %g): %s", self.out_of_range_total, MAX_MAGNITUDE, ", ".join(parts))


#: How many codes or units a drop warning names.
_WARN_DETAIL = 10
_UNIT_RE = re.compile(r"^[A-Za-z0-9%/.*\[\]{}'()^+-]{1,20}$")


def _shown_unit(unit: str) -> str:
    """A unit as a warning may show it: UCUM-looking text of at most 20 characters, else a placeholder."""
    if not unit:
        return "no unit"
    return repr(unit) if _UNIT_RE.match(unit) else "an unrecognised unit"


# ---- resource -> events ----------------------------------------------------------------------------------

_DATE_RE = re.compile(r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})(?:T(?P<t>\d{2}:\d{2}.*))?)?)?$")


def _pick_coding(concept: Any, preferred: str) -> tuple[str, str, str | None] | None:
    """(system, code, display) of the coding in the preferred system, else of the first coded one."""
    if not isinstance(concept, Mapping):
        return None
    codings = [c for c in concept.get("coding") or [] if isinstance(c, Mapping) and c.get("code")]
    if not codings:
        return None
    best = next((c for c in codings if c.get("system") == preferred), codings[0])
    return str(best.get("system") or ""), str(best["code"]), best.get("display") or concept.get("text")


def _quantity(element: Mapping[str, Any]) -> tuple[float | None, str | None]:
    q = element.get("valueQuantity")
    if isinstance(q, Mapping):
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


def _observation_events(res: Mapping[str, Any]) -> list[TimelineEvent]:
    """One event for the Observation's own value, one per valued component (e.g. systolic / diastolic)."""
    if res.get("status") == "entered-in-error":
        return []
    time = _first_time(res.get("effectiveDateTime"), res.get("effectiveInstant"),
                       (res.get("effectivePeriod") or {}).get("start"))
    if time is None:
        return []
    preferred = PREFERRED_SYSTEMS["observation"]
    events: list[TimelineEvent] = []
    components = [c for c in res.get("component") or [] if isinstance(c, Mapping)]
    value, unit = _quantity(res)
    coding = _pick_coding(res.get("code"), preferred)
    if coding and (value is not None or not components):
        events.append(TimelineEvent("observation", coding[0], coding[1], time, value, unit, coding[2]))
    for comp in components:
        cc = _pick_coding(comp.get("code"), preferred)
        if cc:
            cv, cu = _quantity(comp)
            events.append(TimelineEvent("observation", cc[0], cc[1], time, cv, cu, cc[2]))
    return events


def _condition_events(res: Mapping[str, Any]) -> list[TimelineEvent]:
    verification = _pick_coding(res.get("verificationStatus"), "")
    if verification and verification[1] in _NOT_A_DIAGNOSIS:
        return []
    time = _first_time(res.get("onsetDateTime"), (res.get("onsetPeriod") or {}).get("start"),
                       res.get("recordedDate"))
    coding = _pick_coding(res.get("code"), PREFERRED_SYSTEMS["condition"])
    if time is None or coding is None:
        return []
    return [TimelineEvent("condition", coding[0], coding[1], time, None, None, coding[2])]


def _medication_events(res: Mapping[str, Any]) -> list[TimelineEvent]:
    if res.get("status") == "entered-in-error":
        return []
    concept = res.get("medicationCodeableConcept")
    ref = (res.get("medicationReference") or {}).get("reference") or ""
    if concept is None and ref.startswith("#"):  # contained Medication
        contained = [c for c in res.get("contained") or [] if isinstance(c, Mapping)]
        med = next((c for c in contained if c.get("id") == ref[1:]), {})
        concept = med.get("code")
    time = _first_time(res.get("authoredOn"))
    coding = _pick_coding(concept, PREFERRED_SYSTEMS["medication"])
    if time is None or coding is None:
        return []
    return [TimelineEvent("medication", coding[0], coding[1], time, None, None, coding[2])]


def _encounter_events(res: Mapping[str, Any]) -> list[TimelineEvent]:
    if res.get("status") in ("entered-in-error", "cancelled"):
        return []
    preferred = PREFERRED_SYSTEMS["encounter"]
    klass = res.get("class")
    if isinstance(klass, list):  # R5 shape: list of CodeableConcept; the preferred coding of any of them
        codings = [c for k in klass if isinstance(k, Mapping) for c in k.get("coding") or []]
        coding = _pick_coding({"coding": codings}, preferred)
    elif isinstance(klass, Mapping):  # R4: a single Coding
        coding = _pick_coding({"coding": [klass]}, preferred)
    else:
        coding = None
    time = _first_time((res.get("period") or {}).get("start"))
    if time is None or coding is None:
        return []
    return [TimelineEvent("encounter", coding[0], coding[1], time, None, None, coding[2])]


_EXTRACTORS: Final[dict[str, Callable[[Mapping[str, Any]], list[TimelineEvent]]]] = {
    "Observation": _observation_events,
    "Condition": _condition_events,
    "MedicationRequest": _medication_events,
    "Encounter": _encounter_events,
}


__all__ = [
    "MAX_DISPLAY",
    "MAX_MAGNITUDE",
    "PREFERRED_SYSTEMS",
    "READ_ELEMENTS",
    "RESOURCE_KINDS",
    "EventExtraction",
    "EventFilter",
    "EventKind",
    "EventReader",
    "TimelineEvent",
    "ValueBounds",
    "events_from_bundle",
    "events_from_resource",
    "extract_events",
    "fhir_instant",
    "normalise_resource_types",
    "parse_fhir_datetime",
]
