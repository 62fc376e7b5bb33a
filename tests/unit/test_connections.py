"""The listener's refusal log (ingest/connections.py): one line per peer per minute, with the count."""
from __future__ import annotations

import logging

import pytest

from dicom_fusion.service.ingest.connections import RefusalLog


def test_refusals_logged_once_a_minute_per_peer(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    refusals = RefusalLog(clock=lambda: now[0], logger=logging.getLogger("test.refusals"))
    with caplog.at_level("WARNING", logger="test.refusals"):
        for _ in range(50):
            refusals.refused("10.0.0.9", "junk")
            refusals.refused("10.0.0.8", "junk")
            now[0] += 1.0  # 50 s of refusals: one line per peer
        assert len(caplog.records) == 2
        now[0] += 10.0  # a minute after the first line
        refusals.refused("10.0.0.9", "silent")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("connection from 10.0.0.9 refused: junk")
    assert lines[2] == "connection from 10.0.0.9 refused: silent (49 more refused in the last minute)"
