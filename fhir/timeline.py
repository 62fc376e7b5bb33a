"""The EHR timeline of a study: resolve the study's patient on the FHIR server and fetch its events.

This module is what talks to the server — patient lookup, one search per resource type with paging, and
the client-side filters a server may not apply; turning the resources into events is `events.py`'s job,
the same function that reads a training cohort's Bundles, so serving feeds the model what it was trained
on. Servers differ in which search parameters they honour, so every server-side filter is repeated client
side: the time window (a server may ignore `date`) and the subject (a server that ignored `subject` would
otherwise hand us other patients' data). Numeric values are brought to the units the model expects
(`target_units`, see `units.py`); a value that cannot be converted is dropped and counted, and so is a value
outside the model card's plausible bounds (`value_bounds`).

The server is not trusted: a resource of another type than the search asked for (an Organization in a
Patient search), another patient's resource, a Patient with an invalid id or without the identifier we
searched for is ignored and counted by reason (`Timeline.ignored_resources`), and the whole fetch — patient
lookup and every search, all pages and retries — runs under one `FetchLimits` budget (deadline, pages,
resources, bytes): past it the fetch raises `FetchLimitExceeded` and the caller predicts image-only.

Memory is bounded by what the model reads, not by what the server sends: pages are read one at a time
(`FhirClient.search` is lazy), each resource is turned into events as it arrives (`events.EventReader`),
only the events `keep` accepts are kept (the model card's features), and the resources that contributed
go to `on_resource` (the caller streams them to disk) instead of a list.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast, get_args

from dicom_fusion.fhir.client import FetchBudget, FetchLimits, FhirClient
from dicom_fusion.fhir.events import (
    READ_ELEMENTS,
    EventFilter,
    EventReader,
    TimelineEvent,
    fhir_instant,
    normalise_resource_types,
)

log = logging.getLogger(__name__)

TimelineStatus = Literal["ok", "no_patient", "ambiguous_patient", "empty", "unavailable"]
MatchStatus = Literal["matched", "not_found", "ambiguous"]

#: How many Patient matches we look at: enough to see a merged (inactive) duplicate beside the live record.
_PATIENT_PROBE = 10
_TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{1,63}$")
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass(frozen=True)
class Timeline:
    """The patient's events in the window before the study, and why there are none when there are none.

    `resource_count` counts the FHIR resources that contributed at least one event; `dropped_values`
    counts values left out because their unit could not be converted to the model's (see `units.py`),
    `out_of_range_values` those outside the card's plausible bounds, `unused_events` events no model
    feature reads (not kept); `ignored_resources` counts, by reason ("Organization in Patient search",
    "other subject in Observation search"), what the server sent that was not used.
    """

    status: TimelineStatus
    patient_id: str | None
    events: tuple[TimelineEvent, ...] = ()
    resource_count: int = 0
    dropped_values: int = 0
    out_of_range_values: int = 0
    ignored_resources: Mapping[str, int] = dataclasses.field(default_factory=dict)
    unused_events: int = 0

    def __post_init__(self) -> None:
        if self.status not in get_args(TimelineStatus):
            raise ValueError(f"Timeline.status must be one of {get_args(TimelineStatus)}, "
                             f"got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "patient_id": self.patient_id, "resource_count": self.resource_count,
                "dropped_values": self.dropped_values, "out_of_range_values": self.out_of_range_values,
                "ignored_resources": dict(self.ignored_resources), "unused_events": self.unused_events,
                "events": [e.to_dict() for e in self.events]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Timeline:
        return cls(status=cast(TimelineStatus, data["status"]), patient_id=data.get("patient_id"),
                   events=tuple(e if isinstance(e, TimelineEvent) else TimelineEvent.from_dict(e)
                                for e in data.get("events") or ()),
                   resource_count=int(data.get("resource_count", 0)),
                   dropped_values=int(data.get("dropped_values", 0)),
                   out_of_range_values=int(data.get("out_of_range_values", 0)),
                   ignored_resources={str(k): int(v)
                                      for k, v in (data.get("ignored_resources") or {}).items()},
                   unused_events=int(data.get("unused_events", 0)))


@dataclass(frozen=True)
class PatientMatch:
    """Result of looking a DICOM patient up by identifier: exactly one live Patient, none, or several."""

    status: MatchStatus
    patient_id: str | None = None


def resolve_patient(client: FhirClient, system: str | None, value: str, *, budget: FetchBudget | None = None,
                    ignored: Counter[str] | None = None) -> PatientMatch:
    """Find the Patient with identifier `system|value` (any system when `system` is empty).

    Several matches are resolved only when exactly one of them is active (a merged duplicate is marked
    `active: false`); otherwise the match is ambiguous and no timeline is used — guessing would feed one
    patient's history into another patient's report. Matches that are not Patients, whose id is not a
    FHIR id, or that do not carry the identifier searched for (a server that ignores the `identifier`
    parameter answers with any patient) are ignored and counted into `ignored` by reason.
    """
    if not value:
        raise ValueError("resolve_patient needs a non-empty identifier value (DICOM PatientID)")
    wrong: Counter[str] = Counter()
    token = f"{_escape(system)}|{_escape(value)}" if system else _escape(value)
    found = itertools.islice(
        _search(client, "Patient", [("identifier", token), ("_count", str(_PATIENT_PROBE))], budget),
        _PATIENT_PROBE)
    patients: dict[str, dict[str, Any]] = {}
    for p in found:
        if p.get("resourceType") != "Patient":
            wrong[f"{_shown_type(p)} in Patient search"] += 1
        elif not isinstance(p.get("id"), str) or not _ID_RE.match(p["id"]):
            wrong["Patient without a valid id in Patient search"] += 1
        elif not _has_identifier(p, system, value):
            wrong["Patient without the searched identifier in Patient search"] += 1
        else:
            patients[p["id"]] = p
    _warn_ignored(wrong)
    if ignored is not None:
        ignored.update(wrong)
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
                   value_bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
                   elements: bool = False, limits: FetchLimits | None = None,
                   keep: EventFilter | None = None) -> tuple[Timeline, list[dict[str, Any]]]:
    """`read_timeline`, with the resources that contributed events returned as a list (for audit storage).

    For small timelines and tests; a caller that must bound its memory whatever the server sends passes
    `on_resource` to `read_timeline` instead.
    """
    used: list[dict[str, Any]] = []
    timeline = read_timeline(client, identifier_system=identifier_system, identifier_value=identifier_value,
                             study_time=study_time, window_days=window_days, resource_types=resource_types,
                             target_units=target_units, value_bounds=value_bounds, elements=elements,
                             limits=limits, keep=keep, on_resource=used.append)
    return timeline, used


def read_timeline(client: FhirClient, *, identifier_system: str | None, identifier_value: str,
                  study_time: datetime, window_days: int, resource_types: Sequence[str],
                  target_units: Mapping[str, str] | None = None,
                  value_bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
                  elements: bool = False, limits: FetchLimits | None = None, keep: EventFilter | None = None,
                  on_resource: Callable[[dict[str, Any]], None] | None = None) -> Timeline:
    """Resolve the patient and return its events in [study_time - window_days, study_time].

    `target_units` maps `system|code` (e.g. `http://loinc.org|2345-7`) to the UCUM unit the model expects:
    numeric values of those codes are converted to it (`units.convert`), and values whose unit cannot be
    converted — or that carry no unit — are dropped and counted in `Timeline.dropped_values`, never passed
    on mis-scaled. `elements=True` asks the server for only the elements the extraction reads
    (`_elements`), which shrinks the pages; the returned resources are then the subsets the server sent.
    `value_bounds` maps `system|code` to the plausible (min, max) in the target unit (either may be None):
    values outside are dropped and counted in `Timeline.out_of_range_values`. `keep` (e.g. "a feature of
    the model card reads this event") leaves out the events it rejects, counted in `unused_events`.

    `limits` bounds the whole fetch — patient lookup and every search, their pages, retries and waits —
    with one `FetchBudget` (given to a `FhirClient`; a test double without HTTP is called without it).

    Each resource that contributed a kept event is passed to `on_resource` as it arrives (e.g. written to
    the audit file); none is kept here. `FHIRError`s (e.g. `FHIRUnavailable`, `FHIRRetryLater`,
    `FetchLimitExceeded`) propagate: whether to retry or degrade to image-only is the caller's call.
    """
    types = normalise_resource_types(resource_types)
    if window_days <= 0:
        raise ValueError(f"window_days must be positive, got {window_days}")
    if study_time.tzinfo is None:
        raise ValueError("study_time must be timezone-aware; attach the site's timezone (DICOM "
                         "TimezoneOffsetFromUTC or the configured default) before fetching the timeline")
    end = study_time.astimezone(UTC)
    start = end - timedelta(days=window_days)

    budget = FetchBudget(limits) if limits is not None else None
    ignored: Counter[str] = Counter()
    match = resolve_patient(client, identifier_system, identifier_value, budget=budget, ignored=ignored)
    if match.status == "not_found":
        return Timeline("no_patient", None, ignored_resources=dict(ignored))
    if match.status == "ambiguous" or match.patient_id is None:
        return Timeline("ambiguous_patient", None, ignored_resources=dict(ignored))
    patient_id = match.patient_id

    fetched: Counter[str] = Counter()
    kept: Counter[str] = Counter()
    reader = EventReader(resource_types=types, target_units=target_units, value_bounds=value_bounds,
                         start=start, end=end, keep=keep)
    for res in _search_subject(client, patient_id, types, start, end, elements, fetched, ignored, budget):
        if reader.add(res):
            kept[str(res.get("resourceType"))] += 1
            if on_resource is not None:
                on_resource(res)
    read = reader.result()
    ignored.update(read.ignored_resources)
    for rtype in types:
        log.info("timeline %s: %d fetched, %d used", rtype, fetched[rtype], kept[rtype])
    status: TimelineStatus = "ok" if read.events else "empty"
    used = sum(kept.values())
    log.info("timeline: %s, %d events from %d resources (%d events no feature reads)%s", status,
             len(read.events), used, read.unused_events,
             f" in {budget.elapsed():.1f} s ({budget.pages} page(s), {budget.bytes} bytes)" if budget else "")
    return Timeline(status, patient_id, read.events, used, read.dropped_values, read.out_of_range_values,
                    dict(ignored), read.unused_events)


def _search_subject(client: FhirClient, patient_id: str, types: Sequence[str], start: datetime,
                    end: datetime, elements: bool, fetched: Counter[str], ignored: Counter[str],
                    budget: FetchBudget | None) -> Iterator[dict[str, Any]]:
    """The patient's resources of each type, once each; other types and other subjects' left out, counted
    into `ignored` by reason and warned about; counts what each search returned into `fetched`."""
    for rtype in types:
        seen: set[str] = set()
        foreign = 0
        wrong: Counter[str] = Counter()
        query = _query(rtype, patient_id, start, end)
        if elements:
            query.append(("_elements", ",".join(READ_ELEMENTS[rtype])))
        for res in _search(client, rtype, query, budget):
            if res.get("resourceType") != rtype:
                wrong[f"{_shown_type(res)} in {rtype} search"] += 1
                continue
            rid = res.get("id")
            if isinstance(rid, str) and rid:
                if rid in seen:  # offset paging can repeat a resource when data changes between pages
                    continue
                seen.add(rid)
            fetched[rtype] += 1
            if not _is_subject(res, patient_id):
                foreign += 1
                continue
            yield res
        if foreign:
            ignored[f"other subject in {rtype} search"] += foreign
            log.warning("%s search returned %d resource(s) of other subjects; the server may ignore the "
                        "'subject' parameter — dropped them", rtype, foreign)
        _warn_ignored(wrong)
        ignored.update(wrong)


def _search(client: FhirClient, rtype: str, query: list[tuple[str, str]],
            budget: FetchBudget | None) -> Iterator[dict[str, Any]]:
    """`client.search`, under `budget` when there is one and the client speaks HTTP (test doubles that
    answer from memory take no budget)."""
    if budget is not None and isinstance(client, FhirClient):
        return client.search(rtype, query, budget=budget)
    return client.search(rtype, query)


def _shown_type(resource: dict[str, Any]) -> str:
    """A resource's type as logs and counters may show it: a FHIR type name, never free text."""
    rtype = resource.get("resourceType")
    return rtype if isinstance(rtype, str) and _TYPE_RE.match(rtype) else "invalid resourceType"


def _warn_ignored(ignored: Mapping[str, int]) -> None:
    if ignored:
        log.warning("timeline: ignored what the server should not have sent: %s",
                    ", ".join(f"{reason} ×{n}" for reason, n in sorted(ignored.items())))


# ---- queries ---------------------------------------------------------------------------------------------


def _query(rtype: str, patient_id: str, start: datetime, end: datetime) -> list[tuple[str, str]]:
    query = [("subject", f"Patient/{patient_id}")]
    if rtype == "Observation":  # the one date parameter every server supports the same way
        # whole seconds: 'ge' floors and 'le' covers its whole second, so the window is never narrowed
        query += [("date", f"ge{fhir_instant(start.replace(microsecond=0))}"),
                  ("date", f"le{fhir_instant(end.replace(microsecond=0))}")]
    return query


def _escape(value: str | None) -> str:
    """Escape FHIR search separators in a token part (`\\`, `|`, `,`, `$`)."""
    return re.sub(r"([\\|,$])", r"\\\1", value or "")


def _has_identifier(patient: dict[str, Any], system: str | None, value: str) -> bool:
    """Whether a Patient carries the identifier `system|value` (any system when `system` is empty)."""
    for ident in patient.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("value") == value and (not system or ident.get("system") == system):
            return True
    return False


def _is_subject(resource: dict[str, Any], patient_id: str) -> bool:
    subject = resource.get("subject")
    ref = subject.get("reference") if isinstance(subject, dict) else None
    if not isinstance(ref, str):
        return False
    ref = ref.split("/_history/")[0]
    return ref == f"Patient/{patient_id}" or ref.endswith(f"/Patient/{patient_id}")


__all__ = ["MatchStatus", "PatientMatch", "Timeline", "TimelineStatus", "fetch_timeline", "read_timeline",
           "resolve_patient"]
