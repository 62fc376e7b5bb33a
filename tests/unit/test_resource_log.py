"""ResourceLog: the timeline's audit file written one resource at a time, byte-identical to the list
encoded at once (so a timeline's digest did not change when the stage began to stream it)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dicom_fusion.service.jobs.resource_log import ResourceLog


@pytest.mark.parametrize("resources", [[], [{"resourceType": "Observation", "id": "1", "b": [1, 2], "a": "é"}],
                                       [{"id": str(i), "z": {"y": i}} for i in range(5)]])
def test_streamed_file_equals_the_list_encoded_at_once(tmp_path: Path, resources: list[dict]) -> None:
    with ResourceLog(tmp_path, fsync=True) as log:
        for r in resources:
            log.add(r)
        path = log.commit()
    blob = json.dumps(resources, sort_keys=True).encode()
    digest = hashlib.sha256(blob).hexdigest()
    assert (log.digest, log.count) == (digest, len(resources))
    assert path == tmp_path / f"resources-{digest[:16]}.json" and path.read_bytes() == blob
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_fetch_that_fails_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ResourceLog(tmp_path, fsync=False) as log:
        log.add({"id": "1"})
        raise RuntimeError("the server went away")
    assert list(tmp_path.iterdir()) == []


def test_timeline_record_streams_out_and_reads_back_as_events(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from dicom_fusion.fhir.events import TimelineEvent
    from dicom_fusion.fhir.timeline import Timeline
    from dicom_fusion.service.jobs.resource_log import read_timeline_record, write_timeline_record

    events = tuple(TimelineEvent("observation", "http://loinc.org", "2345-7", datetime(2025, 1, 1 + i, tzinfo=UTC),
                                 90.0 + i, "mg/dL", "Glucose") for i in range(3))
    tl = Timeline("ok", "p1", events, resource_count=3, ignored_resources={"Organization in Patient search": 1})
    record = {"status": "ok", "timeline": Timeline("ok", "p1", (), 3, ignored_resources=tl.ignored_resources).to_dict(),
              "resources_sha256": "ab", "identifier_system": "urn:x"}
    path = tmp_path / "timeline.json"
    write_timeline_record(path, record, events, fsync=True)
    assert json.loads(path.read_text())["timeline"]["events"] == [e.to_dict() for e in events]  # plain JSON
    back = read_timeline_record(path)
    assert back["identifier_system"] == "urn:x"
    assert Timeline.from_dict(back["timeline"]) == tl
    assert back["timeline"]["events"][0].code is back["timeline"]["events"][1].code
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.json"]
