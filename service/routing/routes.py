"""Routes: which studies go to which model, and which series it reads. Everything else is ignored.

An ordered list of routes (`[[routes]]` in the configuration, or the file named by `routing.file`);
the first route that matches a study wins, unless it says `continue = true`: then the routes after it are
still tried, and every matching route up to the first one without `continue` gives the study one job (one
study can feed two models). A route matches when at least one series of the study
(after the never-process exclusions of :mod:`.exclusions`) satisfies its `match` and the route's model
reads that series' modality. README "Routing" documents the language; in short:

```toml
[[routes]]
name = "chest-xray"                       # unique
model = "default"                         # a model card path, or "default" (`model.card`)
series = "largest"                        # largest | matching | all
refuse_burned_in = false                  # also exclude BurnedInAnnotation YES series
continue = false                          # true: the routes after this one are still tried
priority = "normal"                       # urgent | normal | background
priority_by_calling_ae = { ED_XR = "urgent" }   # overrides `priority` for studies this AE sent
[routes.match]                            # keys are ANDed; `all`, `any` (lists) and `not` nest
Modality = ["DX", "CR"]                   # text: exact, case-insensitive; a list = any of them
SeriesDescription = "chest|thorax"        # descriptions and ProtocolName: regular expressions
PatientAge = { min = 18 }                 # numbers: { min, max } (ages in years)
```

Every route is checked when loaded (unknown attribute, bad regular expression, missing or invalid
model card, duplicate name): a bad route table never replaces a good one and `serve` refuses to start
with the file, route and field named. Regular expressions run on the `regex` engine with a per-match
timeout, so a pathological pattern costs `routing.regex_timeout_ms`, never the listener's time.
"""
from __future__ import annotations

import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

from dicom_fusion.inference.card.model import ModelCard, load_card, verify_weights
from dicom_fusion.inference.errors import ModelCardError
from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import ConfigError
from dicom_fusion.service.routing.exclusions import series_exclusion, study_exclusion
from dicom_fusion.service.routing.headers import SeriesHeader, StudyHeader

SERIES_SELECTIONS = ("largest", "matching", "all")
ROUTE_KEYS = frozenset({"name", "model", "series", "refuse_burned_in", "match", "release", "continue",
                        "priority", "priority_by_calling_ae"})
RELEASE_MODES = ("auto", "review")  # README "Review"; unset = the global `release.mode`
PRIORITIES = ("urgent", "normal", "background")  # README "Routing", "Priority"; jobs/queues.py queues them
DEFAULT_ROUTE = "default"
# With no route configured: `default` (the radiograph model on every series it reads), then `chest-ct`,
# the packaged chest CT model (`model.ct_card`; "" = no such route) on the largest chest CT series of at
# least CT_MIN_SLICES slices (a single CT slice is no volume for a 3D model).
CT_ROUTE = "chest-ct"
CT_MIN_SLICES = 16
IMPLICIT_SOURCE = "implicit routes (no route configured)"

# attribute -> (kind, value of a series/study). Kinds: text (exact, case-insensitive), pattern (regular
# expression search), multi (every listed value present), number ({min, max}).
_Getter = Callable[[SeriesHeader, StudyHeader], Any]
ATTRIBUTES: dict[str, tuple[str, _Getter]] = {
    "Modality": ("text", lambda s, st: s.modality),
    "BodyPartExamined": ("text", lambda s, st: s.body_part),
    "SOPClassUID": ("text", lambda s, st: s.sop_class_uid),
    "StationName": ("text", lambda s, st: s.station_name),
    "Manufacturer": ("text", lambda s, st: s.manufacturer),
    "CallingAE": ("text", lambda s, st: st.calling_ae),
    "ImageType": ("multi", lambda s, st: s.image_type),
    "SeriesDescription": ("pattern", lambda s, st: s.series_description),
    "StudyDescription": ("pattern", lambda s, st: st.study_description),
    "ProtocolName": ("pattern", lambda s, st: s.protocol_name),
    "PatientAge": ("number", lambda s, st: st.patient_age_years),
    "instances": ("number", lambda s, st: s.instances),
    "slices": ("number", lambda s, st: s.frames),
}


class RouteError(ConfigError):
    """A route table that cannot be used; the message names the file, the route and the field."""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    why: str  # what failed (when not ok), naming the attribute; never a patient value


class _Node:
    def test(self, series: SeriesHeader, study: StudyHeader) -> Outcome:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class _All(_Node):
    children: tuple[_Node, ...]

    def test(self, series: SeriesHeader, study: StudyHeader) -> Outcome:
        for child in self.children:
            out = child.test(series, study)
            if not out.ok:
                return out
        return Outcome(True, "")


@dataclass(frozen=True)
class _Any(_Node):
    children: tuple[_Node, ...]

    def test(self, series: SeriesHeader, study: StudyHeader) -> Outcome:
        whys = []
        for child in self.children:
            out = child.test(series, study)
            if out.ok:
                return out
            whys.append(out.why)
        return Outcome(False, "none of: " + "; ".join(whys))


@dataclass(frozen=True)
class _Not(_Node):
    child: _Node
    text: str

    def test(self, series: SeriesHeader, study: StudyHeader) -> Outcome:
        out = self.child.test(series, study)
        return Outcome(not out.ok, "" if not out.ok else f"not ({self.text}) matched")


@dataclass(frozen=True)
class _Cond(_Node):
    attribute: str
    kind: str
    expected: Any  # tuple[str, ...] | tuple[regex.Pattern, ...] | tuple[float | None, float | None]
    timeout: float

    def test(self, series: SeriesHeader, study: StudyHeader) -> Outcome:
        value = ATTRIBUTES[self.attribute][1](series, study)
        name = self.attribute
        if self.kind == "text":
            ok = str(value).strip().upper() in self.expected
            return Outcome(ok, "" if ok else f"{name} {value or '(empty)'} is not {', '.join(self.expected)}")
        if self.kind == "multi":
            missing = [v for v in self.expected if v not in value]
            return Outcome(not missing, "" if not missing else f"{name} lacks {', '.join(missing)}")
        if self.kind == "pattern":
            try:
                ok = any(p.search(str(value), timeout=self.timeout) for p in self.expected)
            except TimeoutError:
                return Outcome(False, f"{name}: regular expression timed out (routing.regex_timeout_ms)")
            shown = " | ".join(f"/{p.pattern}/" for p in self.expected)
            return Outcome(ok, "" if ok else f"{name} does not match {shown}")  # value not shown: free text
        low, high = self.expected
        if value is None:
            return Outcome(False, f"{name} unknown")
        ok = (low is None or value >= low) and (high is None or value <= high)
        bounds = f"{'' if low is None else f'≥ {low:g}'}{' and ' if low is not None and high is not None else ''}" \
                 f"{'' if high is None else f'≤ {high:g}'}"
        return Outcome(ok, "" if ok else f"{name} {value:.3g} not {bounds}")


@dataclass(frozen=True)
class Route:
    """One checked route."""

    name: str
    match: _Node
    series: str
    card: ModelCard
    refuse_burned_in: bool
    release: str | None = None  # "auto" | "review"; None = the global `release.mode`
    continues: bool = False  # `continue = true`: after a match, the following routes are still tried
    priority: str = "normal"  # urgent | normal | background
    # calling AE title (upper case) -> priority, overriding `priority` for the studies that AE sent
    priority_by_calling_ae: tuple[tuple[str, str], ...] = ()

    @property
    def model(self) -> str:
        return f"{self.card.name} {self.card.version}"

    def reads(self, series: SeriesHeader) -> bool:
        """The route's model reads this series' modality (its card's `input.modalities`)."""
        return not self.card.input.modalities or series.modality in self.card.input.modalities


@dataclass(frozen=True)
class JobPlan:
    """What a matched route asks for: one job of `card` over `series_uids`."""

    route: str
    card_path: Path
    model: str
    series_uids: tuple[str, ...]
    release: str | None = None
    priority: str = "normal"


@dataclass(frozen=True)
class Decision:
    """Either the job plans (one per matching route, in route order) or the reason the study is ignored."""

    plans: tuple[JobPlan, ...]
    ignored: str | None

    def __post_init__(self) -> None:
        if bool(self.plans) == (self.ignored is not None):
            raise ValueError("a decision has either job plans or an ignored reason")

    @property
    def plan(self) -> JobPlan | None:
        """The first route's plan (the only one unless a matching route says `continue`)."""
        return self.plans[0] if self.plans else None


@dataclass(frozen=True)
class RouteVerdict:
    """One route's answer for a study (the rule tester prints these)."""

    route: str
    model: str
    matched: bool
    series_uids: tuple[str, ...]
    why: str


def _label(series: SeriesHeader) -> str:
    """How a verdict names a series: its number and modality (never a description: free text)."""
    return f"series {series.series_number if series.series_number is not None else '?'} ({series.modality})"


class RouteTable:
    """The ordered, checked routes and the never-process rules."""

    def __init__(self, routes: Sequence[Route], *, source: str,
                 priority_by_calling_ae: dict[str, str] | None = None) -> None:
        self.routes = tuple(routes)
        self.source = source
        # `routing.priority_by_calling_ae`: every route's override unless the route names the AE itself
        self.priority_by_calling_ae = {k.strip().upper(): v for k, v in (priority_by_calling_ae or {}).items()}

    def priority(self, route: Route, study: StudyHeader) -> str:
        """The priority of `route`'s job for `study`: the route's entry for the study's calling AE, else
        `routing.priority_by_calling_ae`'s, else the route's `priority`."""
        ae = study.calling_ae.strip().upper()
        return dict(route.priority_by_calling_ae).get(ae) or self.priority_by_calling_ae.get(ae) or route.priority

    def _candidates(self, study: StudyHeader, route: Route) -> tuple[list[SeriesHeader], list[str]]:
        kept, reasons = [], []
        for s in study.series:
            why = series_exclusion(s, refuse_burned_in=route.refuse_burned_in)
            if why is None:
                kept.append(s)
            else:
                reasons.append(why)
        return kept, reasons

    def verdict(self, route: Route, study: StudyHeader) -> RouteVerdict:
        candidates, excluded = self._candidates(study, route)
        if not candidates:
            return RouteVerdict(route.name, route.model, False, (),
                                "only series never processed: " + "; ".join(sorted(set(excluded))))
        whys: list[str] = []
        matching: list[SeriesHeader] = []
        for s in candidates:
            out = route.match.test(s, study)
            if not out.ok:
                whys.append(f"{_label(s)}: {out.why}")
            elif not route.reads(s):
                whys.append(f"{_label(s)}: model {route.model} reads {', '.join(route.card.input.modalities)}")
            else:
                matching.append(s)
        if not matching:
            return RouteVerdict(route.name, route.model, False, (), "; ".join(whys))
        if route.series == "largest":
            chosen = [max(matching, key=lambda s: (s.frames, s.instances))]
        elif route.series == "matching":
            chosen = matching
        else:
            chosen = [s for s in candidates if route.reads(s)]
        return RouteVerdict(route.name, route.model, True, tuple(s.series_uid for s in chosen), "")

    def explain(self, study: StudyHeader) -> tuple[str | None, list[RouteVerdict]]:
        """The study-level exclusion (if any) and every route's verdict, in order."""
        excluded = study_exclusion(study)
        if excluded is not None:
            return excluded, []
        return None, [self.verdict(r, study) for r in self.routes]

    def decide(self, study: StudyHeader | None) -> Decision:
        """One job plan per matching route, in order, up to and including the first matching route without
        `continue`; or why the study is ignored."""
        if study is None:
            return Decision((), "no readable DICOM file in the study")
        excluded, verdicts = self.explain(study)
        if excluded is not None:
            return Decision((), excluded)
        plans: list[JobPlan] = []
        for route, v in zip(self.routes, verdicts, strict=True):
            if v.matched:
                plans.append(JobPlan(route.name, route.card.path, route.model, v.series_uids, route.release,
                                     self.priority(route, study)))
                if not route.continues:
                    break
        if plans:
            return Decision(tuple(plans), None)
        if verdicts and all(v.why.startswith("only series never processed") for v in verdicts):
            return Decision((), verdicts[0].why)
        summary = " | ".join(f"route {v.route}: {v.why}" for v in verdicts) or "no routes configured"
        return Decision((), f"no route matched: {summary}"[:1000])


# ---- loading ---------------------------------------------------------------------------------------
def _text_values(raw: Any, where: str) -> tuple[str, ...]:
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise RouteError(f"{where}: expected a non-empty text or a list of texts, got {raw!r}")
    return tuple(v.strip().upper() for v in values)


def _compile(pattern: Any, where: str) -> regex.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise RouteError(f"{where}: expected a regular expression (text), got {pattern!r}")
    try:
        return regex.compile(pattern, regex.IGNORECASE | regex.VERSION1)
    except regex.error as exc:
        raise RouteError(f"{where}: invalid regular expression {pattern!r}: {exc}") from exc


def _number(raw: Any, key: str, where: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RouteError(f"{where}.{key}: expected a number, got {value!r}")
    return float(value)


def _condition(attribute: str, raw: Any, where: str, timeout: float) -> _Node:
    if attribute not in ATTRIBUTES:
        raise RouteError(f"{where}: unknown attribute {attribute!r}; use one of {', '.join(ATTRIBUTES)}, "
                         "or all / any / not")
    kind = ATTRIBUTES[attribute][0]
    if kind == "number":
        if not isinstance(raw, dict) or not raw or set(raw) - {"min", "max"}:
            raise RouteError(f"{where}: expected {{ min = …, max = … }}, got {raw!r}")
        low, high = _number(raw, "min", where), _number(raw, "max", where)
        if low is not None and high is not None and low > high:
            raise RouteError(f"{where}: min {low:g} is above max {high:g}")
        return _Cond(attribute, kind, (low, high), timeout)
    if isinstance(raw, dict):  # { regex = "…" } on any text attribute
        if set(raw) != {"regex"} or kind == "multi":
            raise RouteError(f"{where}: the only table a text attribute takes is {{ regex = \"…\" }}")
        return _Cond(attribute, "pattern", (_compile(raw["regex"], where),), timeout)
    if kind == "pattern":
        values = raw if isinstance(raw, list) else [raw]
        return _Cond(attribute, kind, tuple(_compile(v, where) for v in values), timeout)
    return _Cond(attribute, kind, _text_values(raw, where), timeout)


def _match(raw: Any, where: str, timeout: float) -> _Node:
    if not isinstance(raw, dict):
        raise RouteError(f"{where}: expected a table of conditions, got {type(raw).__name__}")
    nodes: list[_Node] = []
    for key, value in raw.items():
        at = f"{where}.{key}"
        if key in ("all", "any"):
            if not isinstance(value, list) or not value:
                raise RouteError(f"{at}: expected a non-empty list of condition tables")
            children = tuple(_match(v, f"{at}[{i}]", timeout) for i, v in enumerate(value))
            nodes.append(_All(children) if key == "all" else _Any(children))
        elif key == "not":
            nodes.append(_Not(_match(value, at, timeout), ", ".join(value) if isinstance(value, dict) else key))
        else:
            nodes.append(_condition(key, value, at, timeout))
    return _All(tuple(nodes))


def route_card_path(raw: dict[str, Any], where: str, settings: Settings, base: Path | None) -> Path:
    """The model card a route table names: `model = "default"` (or none) is `model.card`, any other value a
    card path, relative to the route file when there is one (`base`). Raises :class:`RouteError`."""
    model = raw.get("model", DEFAULT_ROUTE)
    if not isinstance(model, str) or not model:
        raise RouteError(f"{where}: model: a model card path or \"default\", got {model!r}")
    card_path = settings.model_card_path() if model == DEFAULT_ROUTE else Path(model)
    if base is not None and not card_path.is_absolute():
        card_path = base / card_path  # relative to the route file
    return card_path


def route_where(raw: Any, index: int, source: str) -> str:
    """How a message names a route table: by its name, else by its position. Raises :class:`RouteError` when
    it is no table or has no name."""
    where = f"{source}: route #{index + 1}"
    if not isinstance(raw, dict):
        raise RouteError(f"{where}: expected a table, got {type(raw).__name__}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RouteError(f"{where}: name: every route needs a name")
    return f"{source}: route {name!r}"


def _route(raw: Any, index: int, source: str, base: Path | None, settings: Settings, timeout: float) -> Route:
    where = route_where(raw, index, source)
    unknown = set(raw) - ROUTE_KEYS
    if unknown:
        raise RouteError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                         f"{', '.join(sorted(ROUTE_KEYS))}")
    card_path = route_card_path(raw, where, settings, base)
    try:
        card = load_card(card_path)
        verify_weights(card)  # the worker would refuse these weights; refuse the route now
    except (ModelCardError, OSError) as exc:
        raise RouteError(f"{where}: model: cannot load the model card {card_path}: {exc}") from exc
    series = raw.get("series", "largest")
    if series not in SERIES_SELECTIONS:
        raise RouteError(f"{where}: series: {series!r} is unknown; use one of {', '.join(SERIES_SELECTIONS)}")
    refuse = raw.get("refuse_burned_in", False)
    if not isinstance(refuse, bool):
        raise RouteError(f"{where}: refuse_burned_in: expected true or false, got {refuse!r}")
    release = raw.get("release")
    if release is not None and release not in RELEASE_MODES:
        raise RouteError(f"{where}: release: {release!r} is unknown; use one of {', '.join(RELEASE_MODES)}")
    continues = raw.get("continue", False)
    if not isinstance(continues, bool):
        raise RouteError(f"{where}: continue: expected true or false, got {continues!r}")
    priority = raw.get("priority", "normal")
    if priority not in PRIORITIES:
        raise RouteError(f"{where}: priority: {priority!r} is unknown; use one of {', '.join(PRIORITIES)}")
    by_ae = _priority_table(raw.get("priority_by_calling_ae", {}), f"{where}: priority_by_calling_ae")
    return Route(name=str(raw["name"]).strip(), match=_match(raw.get("match", {}), f"{where}: match", timeout),
                 series=series, card=card, refuse_burned_in=refuse, release=release, continues=continues,
                 priority=priority, priority_by_calling_ae=tuple(sorted(by_ae.items())))


def _priority_table(raw: Any, where: str) -> dict[str, str]:
    """`{ AE_TITLE = "urgent", … }` checked; keys upper-cased (AE titles are compared case-insensitively)."""
    if not isinstance(raw, dict):
        raise RouteError(f"{where}: expected a table {{ CALLING_AE = \"urgent\" }}, got {raw!r}")
    table: dict[str, str] = {}
    for ae, priority in raw.items():
        if not isinstance(ae, str) or not ae.strip() or len(ae.strip()) > 16:
            raise RouteError(f"{where}: {ae!r} is not an AE title (1-16 characters)")
        if priority not in PRIORITIES:
            raise RouteError(f"{where}.{ae}: priority {priority!r} is unknown; use one of {', '.join(PRIORITIES)}")
        table[ae.strip().upper()] = priority
    return table


def route_entries(settings: Settings) -> tuple[list[Any], str, Path | None]:
    """The raw route tables, where they come from (`routing.file`, else the configuration) and the folder
    relative model paths are read from (the route file's; None = the working directory)."""
    path = settings.routing.file
    if path is None:
        return list(settings.routes), "configuration [[routes]]", None
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise RouteError(f"{path}: cannot read the route file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise RouteError(f"{path}: not valid TOML: {exc}") from exc
    extra = set(data) - {"routes"}
    if extra:
        raise RouteError(f"{path}: unknown top-level key(s) {', '.join(sorted(extra))}; a route file holds "
                         "[[routes]] tables only")
    if settings.routes:
        raise RouteError(f"{path}: routes are given both in routing.file and as [[routes]] in the "
                         "configuration; keep one")
    routes = data.get("routes", [])
    if not isinstance(routes, list):
        raise RouteError(f"{path}: routes must be [[routes]] tables")
    return routes, str(path), Path(path).parent


def implicit_routes(settings: Settings) -> list[dict[str, Any]]:
    """The route table in force when none is configured: `default` (the packaged radiograph model, or
    `model.card`, on every series it reads), then `chest-ct` (`model.ct_card`, unless empty)."""
    entries: list[dict[str, Any]] = [{"name": DEFAULT_ROUTE, "model": DEFAULT_ROUTE, "series": "all"}]
    ct_card = settings.ct_card_path()
    if ct_card is not None:
        entries.append({"name": CT_ROUTE, "model": str(ct_card), "series": "largest", "match": {
            "Modality": "CT", "slices": {"min": CT_MIN_SLICES},
            "any": [{"BodyPartExamined": "CHEST"}, {"StudyDescription": "chest|thorax|lung"}]}})
    return entries


def routes_in_force(settings: Settings) -> tuple[list[Any], str, Path | None]:
    """:func:`route_entries`, or :func:`implicit_routes` when none is configured (unchecked raw tables;
    `ops/served_models.py` lists their cards one by one). Raises :class:`RouteError`."""
    entries, source, base = route_entries(settings)
    if not entries:
        return implicit_routes(settings), IMPLICIT_SOURCE, base
    return entries, source, base


def load_routes(settings: Settings) -> RouteTable:
    """The checked route table of the settings; with no route configured, :func:`implicit_routes`.
    Raises :class:`RouteError`."""
    timeout = settings.routing.regex_timeout_ms / 1000.0
    entries, source, base = routes_in_force(settings)
    routes = [_route(raw, i, source, base, settings, timeout) for i, raw in enumerate(entries)]
    seen: set[str] = set()
    for r in routes:
        if r.name in seen:
            raise RouteError(f"{source}: route {r.name!r}: name: used by an earlier route; names are unique")
        seen.add(r.name)
    return RouteTable(routes, source=source, priority_by_calling_ae=_priority_table(
        settings.routing.priority_by_calling_ae, "routing.priority_by_calling_ae"))


def phantom_pattern(settings: Settings) -> regex.Pattern[str] | None:
    """`routing.phantom_pattern` compiled (None when unset)."""
    pattern = settings.routing.phantom_pattern
    return _compile(pattern, "routing.phantom_pattern") if pattern else None

