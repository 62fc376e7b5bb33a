"""Completion in `pacs` mode: the decision (`pacs_rule`, `counts_met`), the settings (`completion.mode`,
the deprecated `on_release` alias) and the poll loop on a real SQLite ledger with counts handed in as the
PACS's answers (the C-FIND against a real Orthanc is tests/integration/test_completion_pacs.py)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from dicom_fusion.service.config import CompletionSettings
from dicom_fusion.service.errors import PacsQueryError
from dicom_fusion.service.jobs.completion import (
    NO_ANSWER_RULE,
    Completion,
    PacsAnswer,
    PacsTimers,
    counts_met,
    pacs_rule,
)
from dicom_fusion.service.outputs.query import StudyCounts
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import InstanceRecord

TIMERS = PacsTimers(settle=2.0, max_wait=60.0, quiet=10.0)
TWO_SERIES = StudyCounts(total=5, series={"s1": 3, "s2": 2})


def _rule(answer: PacsAnswer = PacsAnswer.COUNTS, expected: StudyCounts | None = TWO_SERIES,
          have: dict[str, int] | None = None, since_first: float = 5.0, since_last: float = 2.5) -> str | None:
    have = {"s1": 3, "s2": 2} if have is None else have
    return pacs_rule(answer=answer, expected=expected, have_total=sum(have.values()), have_series=have,
                     since_first=since_first, since_last=since_last, timers=TIMERS)


def test_counts_met_needs_the_total_and_every_series() -> None:
    assert counts_met({"s1": 3, "s2": 2}, 5, TWO_SERIES)
    assert counts_met({"s1": 3, "s2": 3}, 6, TWO_SERIES)  # more than the PACS knows of: complete
    assert not counts_met({"s1": 5}, 5, TWO_SERIES)  # the total, but series s2 is missing
    assert not counts_met({"s1": 3, "s2": 1}, 4, TWO_SERIES)
    assert counts_met({"x": 4}, 4, StudyCounts(total=4))  # a PACS that answered at STUDY level only


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({}, "pacs counts 5/5"),
    ({"since_last": 1.0}, None),  # counts match, but not settled yet
    ({"have": {"s1": 3}}, None),  # one series still missing
    ({"have": {"s1": 3}, "since_first": 61.0}, "max wait 60 s (pacs counts 3/5)"),
    ({"have": {"s1": 3}, "since_first": 61.0, "since_last": 0.5}, None),  # still arriving: settle first
    ({"answer": PacsAnswer.PENDING, "expected": None}, None),  # first answer not in yet
    ({"answer": PacsAnswer.PENDING, "expected": None, "since_first": 70.0}, "max wait 60 s (pacs counts 5/unknown)"),
    ({"answer": PacsAnswer.NONE, "expected": None, "since_last": 9.0}, None),
    ({"answer": PacsAnswer.NONE, "expected": None, "since_last": 10.0}, NO_ANSWER_RULE),
])
def test_pacs_rule(kwargs: dict[str, object], expected: str | None) -> None:
    assert _rule(**kwargs) == expected  # type: ignore[arg-type]


def test_mode_and_deprecated_on_release_alias() -> None:
    assert CompletionSettings().mode == "quiet"
    assert CompletionSettings(on_release=True).mode == "release"
    assert CompletionSettings(on_release="true", mode="release").mode == "release"
    assert CompletionSettings(on_release=False, mode="pacs").mode == "pacs"
    with pytest.raises(ValidationError, match='deprecated spelling of mode = "release"'):
        CompletionSettings(on_release=True, mode="pacs")
    with pytest.raises(ValidationError, match="max_wait_seconds"):
        CompletionSettings(settle_seconds=5, max_wait_seconds=3)
    with pytest.raises(ValidationError):
        CompletionSettings(mode="timer")


# ---- the poll loop on a real ledger --------------------------------------------------------------

def _receive(ledger: Ledger, study: str, series: str, sop: str) -> None:
    ledger.record_instances([InstanceRecord(study_uid=study, series_uid=series, sop_uid=sop,
                                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", modality="DX",
                                            transfer_syntax="1.2.840.10008.1.2.1", path=Path("/x"),
                                            sha256="0" * 64, size=1, calling_ae="PACS")])


class _Pacs:
    """The PACS's answers, changeable by the test; counts each question."""

    def __init__(self, counts: StudyCounts | None | Exception) -> None:
        self.counts = counts
        self.asked = 0

    def __call__(self, study_uid: str) -> StudyCounts | None:
        self.asked += 1
        if isinstance(self.counts, Exception):
            raise self.counts
        return self.counts


def _completion(ledger: Ledger, pacs: _Pacs, started: list[int], requery: float = 30.0,
                **timers: float) -> Completion:
    t = PacsTimers(**{"settle": 0.2, "max_wait": 30.0, "quiet": 30.0, **timers})
    return Completion(ledger, lambda job_id, stage: started.append(job_id), quiet_seconds=t.quiet,
                      ask_pacs=pacs, timers=t, requery_seconds=requery)


def _poll_until(completion: Completion, seconds: float) -> list[int]:
    jobs: list[int] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not jobs:
        jobs = completion.poll()
        time.sleep(0.05)
    return jobs


def _audit(ledger: Ledger, job_id: int) -> str:
    return " | ".join(e.detail or "" for e in ledger.audit_events("job", job_id))


def test_poll_waits_for_the_pacs_counts_then_completes(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    pacs, started = _Pacs(StudyCounts(total=3, series={"1.9.1": 2, "1.9.2": 1})), []
    completion = _completion(ledger, pacs, started)
    _receive(ledger, "1.9", "1.9.1", "1.9.1.1")
    _receive(ledger, "1.9", "1.9.1", "1.9.1.2")
    assert _poll_until(completion, 1.0) == []  # settled, but series 1.9.2 is missing
    _receive(ledger, "1.9", "1.9.2", "1.9.2.1")
    [job] = _poll_until(completion, 3.0)
    assert started == [job]
    assert "completion: pacs counts 3/3" in _audit(ledger, job)
    completion.close()


def test_a_study_growing_on_the_pacs_is_queried_again(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    pacs, started = _Pacs(StudyCounts(total=2, series={"1.8.1": 2})), []
    completion = _completion(ledger, pacs, started, settle=0.5)
    _receive(ledger, "1.8", "1.8.1", "1.8.1.1")
    assert _poll_until(completion, 0.7) == []  # the PACS has 2 (it forwards as it receives), we have 1
    assert pacs.asked == 1
    pacs.counts = StudyCounts(total=3, series={"1.8.1": 3})  # the PACS received a third one meanwhile
    _receive(ledger, "1.8", "1.8.1", "1.8.1.2")
    assert _poll_until(completion, 1.5) == []  # our 2 reached its 2: asked again, it now says 3
    assert pacs.asked == 2
    _receive(ledger, "1.8", "1.8.1", "1.8.1.3")
    [job] = _poll_until(completion, 3.0)
    assert pacs.asked == 3  # reached 3 with an answer given when we had 2: confirmed once more
    assert "completion: pacs counts 3/3" in _audit(ledger, job)
    completion.close()


def test_counts_that_never_match_end_at_the_max_wait(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    pacs, started = _Pacs(StudyCounts(total=4, series={"1.7.1": 4})), []
    completion = _completion(ledger, pacs, started, requery=0.3, max_wait=1.0)
    _receive(ledger, "1.7", "1.7.1", "1.7.1.1")
    t0 = time.monotonic()
    [job] = _poll_until(completion, 4.0)
    assert time.monotonic() - t0 >= 0.9
    assert "completion: max wait 1 s (pacs counts 1/4)" in _audit(ledger, job)
    assert pacs.asked >= 2  # re-queried every requery_seconds while the counts did not match
    completion.close()


@pytest.mark.parametrize("answer", [None, PacsQueryError("refused")], ids=["no match", "refused"])
def test_no_answer_falls_back_to_the_quiet_period_logged_once(
        tmp_path: Path, answer: PacsQueryError | None, caplog: pytest.LogCaptureFixture) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    pacs, started = _Pacs(answer), []
    completion = _completion(ledger, pacs, started, quiet=1.0)
    _receive(ledger, "1.6", "1.6.1", "1.6.1.1")
    with caplog.at_level("WARNING"):
        t0 = time.monotonic()
        [job] = _poll_until(completion, 4.0)
    assert time.monotonic() - t0 >= 0.9
    assert f"completion: {NO_ANSWER_RULE}" in _audit(ledger, job)
    assert sum("did not answer the C-FIND" in r.getMessage() for r in caplog.records) == 1
    assert pacs.asked == 1
    completion.close()


def test_the_poll_never_waits_on_a_slow_pacs(tmp_path: Path) -> None:
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    release = threading.Event()

    def slow(study_uid: str) -> StudyCounts | None:
        release.wait(5)
        return StudyCounts(total=1, series={"1.5.1": 1})

    completion = Completion(ledger, lambda job_id, stage: None, quiet_seconds=30.0, ask_pacs=slow,
                            timers=PacsTimers(settle=0.0, max_wait=30.0, quiet=30.0))
    _receive(ledger, "1.5", "1.5.1", "1.5.1.1")
    t0 = time.monotonic()
    assert completion.poll() == []
    assert time.monotonic() - t0 < 1.0
    release.set()
    assert len(_poll_until(completion, 2.0)) == 1
    completion.close()
