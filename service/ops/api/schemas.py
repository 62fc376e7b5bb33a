"""Response schemas of the REST API, built from the read models they serialise.

Each schema is generated from its read model (the frozen dataclasses of :mod:`..monitoring`,
:mod:`..operations`, :mod:`..readiness` and :mod:`..served_models`): a field added to a read model appears
in the API, and a field the API must not show is excluded here by name, so the two cannot drift apart field
by field.
Properties of a read model that the API shows (``JobInfo.latency_seconds``) are named explicitly.
They carry UIDs, counts, states, timestamps (UTC), failure reasons and what the model cards say only: no
patient name, ID or birth date is ever part of a read model, hence of a response.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model

from dicom_fusion.service.ops import monitoring, served_models
from dicom_fusion.service.ops.operations import ActionResult
from dicom_fusion.service.ops.readiness import Check
from dicom_fusion.service.storage.spool import SpoolSpace


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


_SCHEMAS: dict[type, type[BaseModel]] = {}


def _api_type(hint: Any) -> Any:
    """A read model's type as the API states it: nested read models → their schemas, tuples → lists."""
    if hint in _SCHEMAS:
        return _SCHEMAS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[_api_type(args[0])]  # type: ignore[misc]
    if origin in (types.UnionType, typing.Union):
        out = _api_type(args[0])
        for arg in args[1:]:
            out = out | _api_type(arg)
        return out
    return hint


def schema_of(read_model: type, name: str, *, exclude: tuple[str, ...] = (), properties: tuple[str, ...] = (),
              extra: dict[str, tuple[Any, Any]] | None = None) -> type[BaseModel]:
    """The response schema of a dataclass read model: its fields but ``exclude``, the named
    ``properties`` (typed by their return annotation), and API-only ``extra`` fields (type, default)."""
    hints = typing.get_type_hints(read_model)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(read_model):
        if f.name not in exclude:
            fields[f.name] = (_api_type(hints[f.name]), ...)
    for prop in properties:
        getter = getattr(read_model, prop).fget
        fields[prop] = (_api_type(typing.get_type_hints(getter)["return"]), ...)
    unknown = set(exclude) - {f.name for f in dataclasses.fields(read_model)}
    if unknown:
        raise TypeError(f"{read_model.__name__} has no field(s) {sorted(unknown)} to exclude")
    fields.update(extra or {})
    schema = create_model(name, __base__=_Out, __module__=__name__, **fields)
    _SCHEMAS[read_model] = schema
    return schema


class HealthOut(_Out):
    status: str


CheckOut = schema_of(Check, "CheckOut")


class ReadyOut(_Out):
    ready: bool
    checks: list[CheckOut]  # type: ignore[valid-type]


QueueOut = schema_of(monitoring.QueueStatus, "QueueOut")
QueuesOut = schema_of(monitoring.QueueOverview, "QueuesOut")
StudySummaryOut = schema_of(monitoring.StudyRow, "StudySummaryOut", exclude=("updated_at",))
StudyPageOut = schema_of(monitoring.StudyPage, "StudyPageOut")
SeriesOut = schema_of(monitoring.SeriesInfo, "SeriesOut")
DeliveryOut = schema_of(monitoring.DeliveryInfo, "DeliveryOut")
AuditOut = schema_of(monitoring.AuditEntry, "AuditOut")
JobOut = schema_of(monitoring.JobInfo, "JobOut", exclude=("job_id",), properties=("latency_seconds", "report_id"),
                   extra={"report_url": (str | None, None)})
StudyDetailOut = schema_of(monitoring.StudyDetail, "StudyDetailOut", properties=("errors",))
ActionOut = schema_of(ActionResult, "ActionOut")
FailureOut = schema_of(monitoring.Failure, "FailureOut")
LatencyOut = schema_of(monitoring.Latency, "LatencyOut")
BucketOut = schema_of(monitoring.Bucket, "BucketOut")
SpoolSpaceOut = schema_of(SpoolSpace, "SpoolSpaceOut", properties=("low",))
OverviewOut = schema_of(monitoring.Overview, "OverviewOut", exclude=("recent",),
                        properties=("done_last_hour", "instances_last_hour"))

ServedModelOut = schema_of(served_models.ServedModel, "ServedModelOut")
ServedModelsOut = schema_of(served_models.ServedModels, "ServedModelsOut")


class RedeliverOut(_Out):
    redelivered: list[ActionOut]  # type: ignore[valid-type]
