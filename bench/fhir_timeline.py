"""Benchmark: fetch a 2,000-resource EHR timeline from a real FHIR server (sekmet-fhir on loopback).

Loads one synthetic patient with N resources inside the model's window (Observations, Conditions,
MedicationRequests, Encounters), then times `fetch_timeline` the way the service runs it (page size
`fhir.page_size`, default 1000, with and without `_elements`) against a naive client asking 20 per page,
and prints requests, seconds and the ratio. Median of --repeat runs each.

    .venv/bin/python bench/fhir_timeline.py [--resources 2000] [--repeat 5] [--base-url URL]

Without --base-url it starts its own sekmet in a temporary folder and stops it at the end.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from dicom_fusion.fhir import codes
from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.fhir.timeline import fetch_timeline
from dicom_fusion.service.demo.components import start_fhir_server

STUDY_TIME = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
WINDOW_DAYS = 730
SYSTEM = "urn:dicom-fusion:bench"
TYPES = ("Observation", "Condition", "MedicationRequest", "Encounter")
LABS = (("2345-7", "mg/dL", 105.0), ("4548-4", "%", 5.9), ("1988-5", "mg/L", 6.0), ("39156-5", "kg/m2", 27.5),
        ("8480-6", "mm[Hg]", 128.0))


def _resources(n: int, patient: str) -> list[dict[str, Any]]:
    """n resources spread over the window: 85 % Observations, 5 % each of the other three types."""
    out: list[dict[str, Any]] = []
    step = timedelta(days=WINDOW_DAYS - 1) / n
    for i in range(n):
        when = (STUDY_TIME - timedelta(hours=1) - i * step).strftime("%Y-%m-%dT%H:%M:%SZ")
        subject = {"reference": patient}
        kind = i % 20
        if kind == 17:
            out.append({"resourceType": "Condition", "subject": subject, "onsetDateTime": when,
                        "code": {"coding": [{"system": codes.SNOMED_CT, "code": "44054006"}]}})
        elif kind == 18:
            out.append({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                        "subject": subject, "authoredOn": when,
                        "medicationCodeableConcept": {"coding": [{"system": codes.RXNORM, "code": "860975"}]}})
        elif kind == 19:
            out.append({"resourceType": "Encounter", "status": "finished", "subject": subject,
                        "class": {"system": codes.V3_ACT_CODE, "code": "AMB"}, "period": {"start": when}})
        else:
            code, unit, mean = LABS[i % len(LABS)]
            out.append({"resourceType": "Observation", "status": "final", "subject": subject,
                        "category": [{"coding": [{"system": codes.OBSERVATION_CATEGORY,
                                                  "code": "laboratory"}]}],
                        "code": {"coding": [{"system": codes.LOINC, "code": code}], "text": f"lab {code}"},
                        "effectiveDateTime": when, "issued": when,
                        "valueQuantity": {"value": mean + (i % 7) - 3, "unit": unit, "system": codes.UCUM,
                                          "code": unit},
                        "referenceRange": [{"text": "see laboratory handbook"}]})
    return out


def load_patient(client: FhirClient, n: int) -> str:
    """Create the patient and its n resources (transactions of 500); returns the identifier value."""
    mrn = f"BENCH-{uuid.uuid4().hex[:8]}"
    pat = f"urn:uuid:{uuid.uuid4()}"
    resources = _resources(n, pat)
    first = [{"fullUrl": pat, "resource": {"resourceType": "Patient", "identifier": [{"system": SYSTEM,
                                                                                       "value": mrn}]},
              "request": {"method": "POST", "url": "Patient"}}]
    response = client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": first})
    patient_ref = response["entry"][0]["response"]["location"].split("/_history")[0]
    patient_ref = "Patient/" + patient_ref.split("/Patient/")[-1]
    for chunk in range(0, n, 500):
        entries = []
        for r in resources[chunk:chunk + 500]:
            r["subject"] = {"reference": patient_ref}
            entries.append({"resource": r, "request": {"method": "POST", "url": r["resourceType"]}})
        client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    return mrn


def measure(base_url: str, mrn: str, *, page_size: int, elements: bool,
            repeat: int) -> tuple[int, float, int, int]:
    """(requests per fetch, median seconds, resources used, response kB) for one client configuration."""
    times: list[float] = []
    requests = used = size = 0
    for _ in range(repeat):
        sent: list[httpx.Request] = []
        received: list[int] = []

        def count_bytes(response: httpx.Response) -> None:
            received.append(len(response.read()))

        with FhirClient(base_url, page_size=page_size, timeout=60,
                        event_hooks={"request": [sent.append], "response": [count_bytes]}) as client:
            started = time.perf_counter()
            timeline, resources = fetch_timeline(client, identifier_system=SYSTEM, identifier_value=mrn,
                                                 study_time=STUDY_TIME, window_days=WINDOW_DAYS,
                                                 resource_types=TYPES, elements=elements)
            times.append(time.perf_counter() - started)
        if timeline.status != "ok":
            raise SystemExit(f"benchmark patient not found or empty ({timeline.status}); is {base_url} writable?")
        requests, used, size = len(sent), len(resources), sum(received) // 1024
    return requests, statistics.median(times), used, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resources", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--base-url", help="an existing FHIR R4 server (writable); default: start sekmet")
    args = ap.parse_args(argv)

    server = None
    tmp = tempfile.TemporaryDirectory(prefix="bench-fhir-")
    try:
        base_url = args.base_url
        if base_url is None:
            server = start_fhir_server(Path(tmp.name) / "fhir")
            base_url = server.base_url
        with FhirClient(base_url, timeout=120) as client:
            mrn = load_patient(client, args.resources)
        measure(base_url, mrn, page_size=1000, elements=False, repeat=1)  # warm the server's caches

        rows = [("tuned: _count=1000 + _elements", *measure(base_url, mrn, page_size=1000, elements=True,
                                                              repeat=args.repeat)),
                ("tuned: _count=1000", *measure(base_url, mrn, page_size=1000, elements=False,
                                                repeat=args.repeat)),
                ("naive: _count=20", *measure(base_url, mrn, page_size=20, elements=False, repeat=args.repeat))]
        naive_requests, naive_seconds = rows[-1][1], rows[-1][2]
        print(f"fetch_timeline of {args.resources} resources, median of {args.repeat} runs, {base_url}")
        print(f"{'client':34} {'requests':>8} {'seconds':>8} {'resources':>9} {'kB':>6} {'speed-up':>8}")
        for name, requests, seconds, used, size in rows:
            print(f"{name:34} {requests:8d} {seconds:8.3f} {used:9d} {size:6d} {naive_seconds / seconds:7.1f}x")
        best = rows[0]
        print(f"ratio naive/tuned: {naive_requests / best[1]:.1f}x fewer requests, "
              f"{naive_seconds / best[2]:.1f}x less time")
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
