"""Readiness of the whole system, one check per dependency: ledger, broker, spool, PACS, FHIR.

Each check returns a short description or raises; :func:`readiness` runs them in parallel with
short timeouts and reports each one separately, so an operator sees which dependency is down.

:class:`CachedReadiness` is what the API's ``/readyz`` calls: a probe makes a FHIR request and a
C-ECHO to the PACS, and ``/readyz`` answers anyone (load balancers, Kubernetes), so without a cache
every poll, or a caller in a loop, would hit the EHR and the PACS once per request.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import text

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import SpoolError
from dicom_fusion.service.ops.broker import check_broker
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.spool import Spool, spool_space

CHECK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


def check_ledger(ledger: Ledger) -> str:
    with ledger.session() as s:
        s.execute(text("SELECT 1"))
    return f"{ledger.engine.dialect.name} ledger answers"


def check_spool(settings: Settings) -> str:
    """Writable, and over its low-water mark (``spool.min_free_mb``: under it C-STORE gets 0xA700)."""
    Spool(settings.spool_dir, fsync=False).ensure()  # raises SpoolError when not writable
    space = spool_space(settings.spool_dir, settings.spool.min_free_mb)
    if space is not None and space.low:
        raise SpoolError(f"{space.free_mb:.0f} MB free on the spool, under spool.min_free_mb "
                         f"({space.min_free_mb:.0f} MB): C-STORE is answered 0xA700 until space returns; "
                         "free disk space or lower spool.min_free_mb")
    free = "" if space is None else f", {space.free_mb:.0f} MB free"
    return f"{settings.spool_dir} writable{free}"


def check_pacs(settings: Settings) -> str:
    from dicom_fusion.service.outputs.dispatch import DicomNode, echo

    p = settings.pacs
    node = DicomNode(p.ae_title, p.host, p.port)
    if not echo(node, p.calling_ae_title, timeout=min(p.timeout, CHECK_TIMEOUT)):
        raise ConnectionError(f"no C-ECHO answer from {node}; check pacs.host, pacs.port, pacs.ae_title")
    return f"C-ECHO {node} ok"


def check_fhir(settings: Settings) -> str:
    if not settings.fhir.enabled:
        return "disabled (fhir.base_url not set): reports are not owed"
    from dicom_fusion.service.peers import make_fhir_client

    quick = settings.fhir.model_copy(update={"timeout": CHECK_TIMEOUT, "retries": 0})
    with make_fhir_client(quick) as client:
        meta = client.metadata()
    return f"{settings.fhir.shown_base_url} FHIR {meta.get('fhirVersion', '?')} ({meta.get('resourceType', '?')})"


def _timed(name: str, fn: Callable[[], str]) -> Check:
    start = time.perf_counter()
    try:
        detail, ok = fn(), True
    except Exception as exc:  # any failure of a dependency is a "not ready" with its reason
        detail, ok = f"{type(exc).__name__}: {exc}", False
    return Check(name, ok, detail, round(time.perf_counter() - start, 3))


def readiness(ledger: Ledger, settings: Settings) -> list[Check]:
    checks: dict[str, Callable[[], str]] = {
        "ledger": lambda: check_ledger(ledger),
        "broker": lambda: check_broker(settings, timeout=CHECK_TIMEOUT),
        "spool": lambda: check_spool(settings),
        "pacs": lambda: check_pacs(settings),
        "fhir": lambda: check_fhir(settings),
    }
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        futures = [pool.submit(_timed, name, fn) for name, fn in checks.items()]
        return [f.result() for f in futures]


@dataclass(frozen=True)
class Readiness:
    """One probe's checks and when it started (``time.monotonic()``)."""

    checks: list[Check]
    started: float

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)


class CachedReadiness:
    """:func:`readiness`, probed at most once per ``ttl`` seconds whatever the call rate.

    A probe's age counts from its start, so two probes start at least ``ttl`` apart even when one
    waits out its timeouts. Concurrent callers wait for the probe in flight instead of starting their
    own (one lock): 50 parallel ``/readyz`` calls make one FHIR request and one C-ECHO.
    """

    def __init__(self, ledger: Ledger, settings: Settings, ttl: float,
                 probe: Callable[[Ledger, Settings], list[Check]] = readiness,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl > 0:
            raise ValueError(f"the readiness cache needs a positive ttl in seconds, got {ttl!r}")
        self._ledger, self._settings, self._ttl = ledger, settings, ttl
        self._probe, self._clock = probe, clock
        self._lock = threading.Lock()
        self._last: Readiness | None = None

    def get(self) -> Readiness:
        """The latest probe's result, probing first when it is ``ttl`` seconds old or more."""
        with self._lock:
            last = self._last
            if last is None or self._clock() - last.started >= self._ttl:
                started = self._clock()
                last = self._last = Readiness(self._probe(self._ledger, self._settings), started)
            return last

    def age(self, result: Readiness) -> float:
        """Seconds since ``result``'s probe started."""
        return max(0.0, self._clock() - result.started)
