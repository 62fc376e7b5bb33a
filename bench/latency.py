"""End-to-end latency: last C-STORE of a study → SR in the PACS *and* DiagnosticReport in FHIR.

    .venv/bin/python bench/latency.py [--studies 20] [--quiet 2] [--interval 1.0] [--seed 11]

The full stack on loopback, as in production: Redis broker, Orthanc as the PACS, sekmet-fhir as the
EHR (loaded with the synthetic patients' timelines), ``dicom-fusion serve`` with its embedded worker
and the default model. One warm-up study first (not counted: the worker loads the model), then each
study is sent in its own association with DCMTK ``storescu``, one every ``--interval`` seconds. The SR is
looked up in Orthanc (REST ``/tools/lookup``) and the report in FHIR (search by its identifier, the SR
UID) every 50 ms. Prints p50/p95 of the latency, the ratio p95 / target (target = quiet period + 3 s;
≤ 1.00 meets it) and the stage breakdown from the ledger's audit rows (median / p95 per stage).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from stack import BenchStack  # bench/ is on sys.path when a bench runs as a script

STORESCU = "/usr/bin/storescu"
TARGET_MARGIN = 3.0  # seconds allowed after the quiet period


@dataclass
class Sent:
    study_uid: str
    sent_wall: float  # time.time() when storescu returned (last C-STORE acknowledged)
    sent_mono: float
    sr_uid: str | None = None
    sr_seen: float | None = None  # monotonic
    report_seen: float | None = None
    job_id: int | None = None
    state: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.sr_seen is not None and self.report_seen is not None

    @property
    def latency(self) -> float | None:
        if not self.done:
            return None
        return max(self.sr_seen, self.report_seen) - self.sent_mono  # type: ignore[type-var, operator]


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def send_study(files: list[Path], port: int) -> None:
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run([STORESCU, "-aet", "BENCHPACS", "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)],
                   check=True, env=env, capture_output=True)


class Watcher(threading.Thread):
    """Polls the ledger (SR UID of the study's job), Orthanc (the SR) and FHIR (the report)."""

    def __init__(self, ledger_url: str, pacs: object, fhir_url: str) -> None:
        super().__init__(daemon=True)
        from dicom_fusion.fhir.client import FhirClient
        from dicom_fusion.service.storage.ledger import Ledger

        self.ledger = Ledger(ledger_url)
        self.pacs = pacs
        self.fhir = FhirClient(fhir_url)
        self.items: list[Sent] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()

    def add(self, item: Sent) -> None:
        with self.lock:
            self.items.append(item)

    def pending(self) -> int:
        with self.lock:
            return sum(1 for i in self.items if not i.done and i.state != "dead")

    def run(self) -> None:
        from dicom_fusion.fhir import codes

        while not self.stop_event.wait(0.05):
            with self.lock:
                todo = [i for i in self.items if not i.done and i.state != "dead"]
            for item in todo:
                now = time.monotonic()
                if item.sr_uid is None:
                    jobs = self.ledger.jobs_for_study(item.study_uid)
                    if not jobs:
                        continue
                    job = jobs[-1]
                    item.job_id, item.state = job.id, str(job.state)
                    if job.sr_uid is None:
                        continue
                    item.sr_uid = job.sr_uid
                if item.sr_seen is None and self.pacs.instance_count(item.sr_uid):  # type: ignore[attr-defined]
                    item.sr_seen = now
                if item.report_seen is None:
                    found = list(self.fhir.search("DiagnosticReport", {
                        "identifier": f"{codes.DICOM_UID_SYSTEM}|urn:oid:{item.sr_uid}", "_count": "1"}))
                    if found:
                        item.report_seen = now
                if not item.done:
                    job = self.ledger.job(item.job_id) if item.job_id else None
                    if job is not None:
                        item.state = str(job.state)
                        if job.state == "dead":
                            item.errors.append(job.error or "dead")


# ---- stage breakdown from the ledger ------------------------------------------------------------
STAGES = ("prepare", "timeline", "infer", "deliver")
NEXT = {"prepare": "timeline", "timeline": "infer", "infer": "deliver"}


def breakdown(ledger_url: str, item: Sent) -> dict[str, float]:
    """Seconds spent in each phase of one job, from its audit rows (the last attempt of each stage)."""
    from dicom_fusion.service.storage.ledger import Ledger
    from dicom_fusion.service.storage.models import Study

    ledger = Ledger(ledger_url)
    try:
        job = ledger.job(item.job_id) if item.job_id else None
        if job is None:
            return {}
        with ledger.session() as s:
            study = s.get(Study, job.study_id)
        events = ledger.audit_events("job", job.id)
    finally:
        ledger.close()
    assert study is not None
    start: dict[str, datetime] = {}
    end: dict[str, datetime] = {}
    queued_at: dict[str, datetime] = {"prepare": job.created_at}
    for e in events:
        if e.event in ("preparing", "inferring", "delivering") and e.detail.startswith("stage="):
            stage = e.detail.split()[0].split("=", 1)[1]
            start[stage] = e.ts
        elif e.event == "stage_done" and e.detail.startswith("next="):
            nxt = e.detail.split("=", 1)[1]
            prev = next((k for k, v in NEXT.items() if v == nxt), None)
            if prev:
                end[prev] = e.ts
                queued_at[nxt] = e.ts
        elif e.event == "done":
            end["deliver"] = e.ts
    out = {"receive→complete (quiet period)": (job.created_at - study.last_received_at).total_seconds()}
    for stage in STAGES:
        if stage in start and stage in queued_at:
            out[f"{stage}: wait in queue"] = (start[stage] - queued_at[stage]).total_seconds()
        if stage in start and stage in end:
            out[f"{stage}: run"] = (end[stage] - start[stage]).total_seconds()
    # ledger timestamps are naive UTC; the last C-STORE's wall time converts the same way
    sent = datetime.fromtimestamp(item.sent_wall, UTC).replace(tzinfo=None)
    out["last C-STORE→ledger last_received"] = (study.last_received_at - sent).total_seconds()
    if "deliver" in end and item.latency is not None:
        done_wall = item.sent_wall + item.latency
        out["job done→seen in PACS+FHIR"] = done_wall - (end["deliver"] - datetime(1970, 1, 1)).total_seconds()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--quiet", type=float, default=2.0, help="completion.quiet_seconds (target = quiet + 3 s)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between two studies' sends")
    ap.add_argument("--pool", default="solo", help="worker.pool of the embedded worker: solo | threads | prefork")
    ap.add_argument("--concurrency", type=int, default=1, help="worker.concurrency of the embedded worker")
    ap.add_argument("--no-explain", action="store_true",
                    help="model.explain = false (no Grad-CAM / integrated gradients / saliency SC per study)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--timeout", type=float, default=240.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here (logs, ledger)")
    args = ap.parse_args()
    if not Path(STORESCU).exists():
        print(f"{STORESCU} missing: run `make sysdeps`", file=sys.stderr)
        return 2

    from dicom_fusion.inference.synth.generate import generate_cohort
    from dicom_fusion.service.demo.components import free_port, start_redis
    from dicom_fusion.service.server import wait_for_port

    with BenchStack(args.keep, "bench-latency-") as stack:
        work = stack.work
        cohort = generate_cohort(args.studies + 1, work / "cohort", args.seed, progress=False)
        fhir, pacs = stack.peers(cohort)
        redis = stack.add(start_redis(work / "redis"))
        port = free_port()
        env = dict(os.environ, DICOM_FUSION_DATA_DIR=str(work / "var"), DICOM_FUSION_LISTENER__PORT=str(port),
                   DICOM_FUSION_PACS__AE_TITLE=pacs.ae_title, DICOM_FUSION_PACS__PORT=str(pacs.dicom_port),
                   DICOM_FUSION_FHIR__BASE_URL=fhir.base_url, DICOM_FUSION_BROKER__URL=redis.url,
                   DICOM_FUSION_COMPLETION__QUIET_SECONDS=str(args.quiet), DICOM_FUSION_LOG_LEVEL="WARNING",
                   DICOM_FUSION_WORKER__POOL=args.pool, DICOM_FUSION_WORKER__CONCURRENCY=str(args.concurrency))
        if args.no_explain:
            env["DICOM_FUSION_MODEL__EXPLAIN"] = "false"
        env.pop("DICOM_FUSION_CONFIG", None)
        log = (work / "serve.log").open("wb")
        serve = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stack.serve = serve  # stopped (process group) when the stack closes
        wait_for_port("127.0.0.1", port, timeout=60)
        ledger_url = f"sqlite:///{work / 'var' / 'ledger.sqlite'}"
        watcher = Watcher(ledger_url, pacs, fhir.base_url)
        watcher.start()

        def send(p: object) -> Sent:
            files = sorted(Path(p.study_dir).glob("*.dcm"))  # type: ignore[attr-defined]
            send_study(files, port)
            item = Sent(p.study_instance_uid, time.time(), time.monotonic())  # type: ignore[attr-defined]
            watcher.add(item)
            return item

        # Warm-up: the worker starts and loads the model on its first job.
        t0 = time.monotonic()
        warm = send(cohort[0])
        while not warm.done and time.monotonic() - t0 < args.timeout and warm.state != "dead":
            time.sleep(0.1)
        if not warm.done:
            print(f"warm-up study did not finish (state {warm.state or 'none'}; see {work / 'serve.log'})",
                  file=sys.stderr)
            return 1
        print(f"warm-up study: {warm.latency:.2f} s (worker start + model load included; not counted)")
        with watcher.lock:
            watcher.items.remove(warm)
        items: list[Sent] = []
        for p in cohort[1:]:
            nxt = time.monotonic() + args.interval
            items.append(send(p))
            time.sleep(max(0.0, nxt - time.monotonic()))
        deadline = time.monotonic() + args.timeout
        while watcher.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        watcher.stop_event.set()
        watcher.join()
        lat = [i.latency for i in items if i.latency is not None]
        failed = [i for i in items if i.latency is None]
        target = args.quiet + TARGET_MARGIN
        print(f"{len(items)} studies ({sum(len(list(Path(p.study_dir).glob('*.dcm'))) for p in cohort[1:])} "
              f"instances), one every {args.interval:g} s; quiet period {args.quiet:g} s; Redis broker, "
              f"Orthanc, sekmet-fhir, embedded worker ({args.pool} × {args.concurrency}), default model"
              f"{' without explanations' if args.no_explain else ' with explanations (model.explain)'}")
        if failed:
            print(f"NOT DONE: {len(failed)} studies: " + "; ".join(
                f"{i.study_uid[-12:]} {i.state} {i.errors[:1]}" for i in failed[:5]))
        if not lat:
            return 1
        p50, p95 = statistics.median(lat), pct(lat, 95)
        print(f"latency last C-STORE → SR in Orthanc + DiagnosticReport in FHIR: p50 {p50:.2f} s, "
              f"p95 {p95:.2f} s, max {max(lat):.2f} s")
        print(f"ratio p95 / target ({args.quiet:g} s quiet + {TARGET_MARGIN:g} s = {target:g} s): {p95 / target:.2f}"
              f"  ({'meets' if p95 <= target else 'misses'} the target)")
        parts: dict[str, list[float]] = {}
        for i in items:
            for k, v in breakdown(ledger_url, i).items():
                parts.setdefault(k, []).append(v)
        print(f"{'stage (from the ledger)':<40}{'median s':>10}{'p95 s':>9}")
        for k, vs in parts.items():
            print(f"{k:<40}{statistics.median(vs):>10.3f}{pct(vs, 95):>9.3f}")
        runs = [sum(v for k, v in breakdown(ledger_url, i).items() if k.endswith(": run")) for i in items]
        service = statistics.median(runs)
        print(f"worker time per study (sum of stage runs): median {service:.2f} s → {args.concurrency} worker "
              f"slot(s) serve at most ≈ {args.concurrency / service:.2f} studies/s if the CPU keeps up; offered "
              f"load {1 / args.interval:.2f} studies/s")
        return 0 if not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
