"""Readiness of the whole system, one check per dependency: ledger, broker, spool, PACS, FHIR.

Each check returns a short description or raises; :func:`readiness` runs them in parallel with
short timeouts and reports each one separately, so an operator sees which dependency is down.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from sqlalchemy import text

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ops.broker import check_broker
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.spool import Spool

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
    Spool(settings.spool_dir, fsync=False).ensure()  # raises SpoolError when not writable
    return f"{settings.spool_dir} writable"


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
