"""The audit copy of the FHIR resources a prediction saw, written as they arrive.

The timeline stage keeps, for audit and reproduction, the exact resources that contributed events, in a
content-addressed file of the job folder (`resources-<sha256[:16]>.json`). Built as one JSON string it
cost a big timeline its size several times over in the worker's memory (200 000 Observations: ~1 GB); here
each resource is encoded, hashed and written on its own, so memory holds one resource at a time. The bytes
are those of `json.dumps(resources, sort_keys=True)`, so the digest of a timeline is what it always was.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dicom_fusion.service.storage.spool import fsync_dirs


class ResourceLog:
    """Streams resources into `folder/resources-<digest>.json`: `add` each, then `commit` (atomic rename,
    synced when `fsync`); leaving the `with` block without `commit` removes the partial file."""

    def __init__(self, folder: Path, *, fsync: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.fsync = fsync
        self.count = 0
        self._tmp = folder / f".tmp-resources-{uuid.uuid4().hex}"
        self._fh = self._tmp.open("xb")
        self._hash = hashlib.sha256()
        self._write(b"[")
        self.digest: str | None = None

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self._hash.update(data)

    def add(self, resource: dict[str, Any]) -> None:
        """Append one resource (encoded as `json.dumps(..., sort_keys=True)` encodes a list's items)."""
        self._write((b", " if self.count else b"") + json.dumps(resource, sort_keys=True).encode())
        self.count += 1

    def commit(self) -> Path:
        """Close the list, make the file durable under its content-addressed name and return that path."""
        self._write(b"]")
        self._fh.flush()
        if self.fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        self.digest = self._hash.hexdigest()
        final = self.folder / f"resources-{self.digest[:16]}.json"
        os.replace(self._tmp, final)
        if self.fsync:
            fsync_dirs([self.folder])
        return final

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


# ---- timeline.json: the events streamed out and decoded straight into events ------------------------------

_EVENTS = "__events__"


def write_timeline_record(path: Path, record: dict[str, Any], events: Any, *, fsync: bool = True) -> None:
    """Write `record` (the timeline stage's `timeline.json`) with `record["timeline"]["events"]` encoded one
    event at a time from `events` (`TimelineEvent`s), atomically. Encoding the whole record at once built
    every event's dict, the document and its bytes at the same time — several times the events' own size
    for a timeline of 200 000 values."""
    timeline = dict(record["timeline"], events=_EVENTS)
    head, tail = json.dumps(dict(record, timeline=timeline), indent=2, sort_keys=True).split(f'"{_EVENTS}"')
    tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
    try:
        with tmp.open("xb") as fh:
            fh.write(head.encode() + b"[")
            for i, event in enumerate(events):
                fh.write((b",\n" if i else b"\n") + json.dumps(event.to_dict(), sort_keys=True).encode())
            fh.write(b"\n]" + tail.encode())
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dirs([path.parent])


def read_timeline_record(path: Path) -> dict[str, Any]:
    """`timeline.json` with its events decoded straight into `TimelineEvent`s (each event's dict is
    dropped as soon as it is read, and equal strings are shared), ready for `Timeline.from_dict`."""
    from dicom_fusion.fhir.events import TimelineEvent

    strings: dict[str, str] = {}

    def hook(obj: dict[str, Any]) -> Any:
        if obj.keys() == {"kind", "system", "code", "time", "value", "unit", "display"}:
            event = TimelineEvent.from_dict(obj)
            s = strings.setdefault
            return TimelineEvent(event.kind, s(event.system, event.system), s(event.code, event.code), event.time,
                                 event.value, None if event.unit is None else s(event.unit, event.unit),
                                 None if event.display is None else s(event.display, event.display))
        return obj

    with path.open("rb") as fh:
        return json.load(fh, object_hook=hook)
