"""Priority: with 30 normal studies queued, when does an urgent study's result arrive?

    .venv/bin/python bench/priority.py [--normal 30] [--broker redis|embedded] [--seed 13]

The full stack on loopback (as bench/latency.py): Orthanc as the PACS, sekmet-fhir as the EHR, Redis (or
the embedded filesystem broker), ``dicom-fusion serve`` with its embedded worker (solo, one slot) and the
default model; studies complete on association release. One warm-up study first (model load, not
counted). Then the ``--normal`` studies go in one association from AE ``BENCHPACS`` (normal priority):
on its release all of them become jobs queued at once; right after, one study from AE ``ED_MODALITY``,
which ``routing.priority_by_calling_ae`` makes urgent. A result has arrived when its SR is in Orthanc
and its DiagnosticReport in FHIR. Prints the urgent study's position among all results, how many normal
results came before it (the target: fewer than 5, i.e. before the 5th normal one), its latency and the
normal studies' finish times. Exit 0 when the target is met.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import BenchStack  # noqa: E402
from latency import STORESCU, Sent, Watcher  # noqa: E402  (the same loopback stack and result watcher)

URGENT_AE = "ED_MODALITY"
TARGET_BEFORE = 5  # the urgent result must arrive before the 5th normal one


def send(files: list[Path], port: int, calling_ae: str) -> None:
    subprocess.run([STORESCU, "-aet", calling_ae, "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--normal", type=int, default=30, help="normal studies queued before the urgent one")
    ap.add_argument("--broker", choices=("redis", "embedded"), default="redis")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here (logs, ledger)")
    args = ap.parse_args()
    if not Path(STORESCU).exists():
        print(f"{STORESCU} missing: run `make sysdeps`", file=sys.stderr)
        return 2

    from dicom_fusion.inference.synth.generate import generate_cohort
    from dicom_fusion.service.demo.components import free_port, start_redis
    from dicom_fusion.service.server import wait_for_port

    with BenchStack(args.keep, "bench-priority-") as stack:
        work = stack.work
        cohort = generate_cohort(args.normal + 2, work / "cohort", args.seed, progress=False)
        fhir, pacs = stack.peers(cohort)
        port = free_port()
        env = dict(os.environ, DICOM_FUSION_DATA_DIR=str(work / "var"), DICOM_FUSION_LISTENER__PORT=str(port),
                   DICOM_FUSION_PACS__AE_TITLE=pacs.ae_title, DICOM_FUSION_PACS__PORT=str(pacs.dicom_port),
                   DICOM_FUSION_FHIR__BASE_URL=fhir.base_url, DICOM_FUSION_COMPLETION__ON_RELEASE="true",
                   DICOM_FUSION_COMPLETION__QUIET_SECONDS="600", DICOM_FUSION_LOG_LEVEL="WARNING",
                   DICOM_FUSION_ROUTING__PRIORITY_BY_CALLING_AE=json.dumps({URGENT_AE: "urgent"}))
        if args.broker == "redis":
            redis = stack.add(start_redis(work / "redis"))
            env["DICOM_FUSION_BROKER__URL"] = redis.url
        else:
            env.pop("DICOM_FUSION_BROKER__URL", None)
        env.pop("DICOM_FUSION_CONFIG", None)
        log = (work / "serve.log").open("wb")
        serve = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stack.serve = serve  # stopped (process group) when the stack closes
        wait_for_port("127.0.0.1", port, timeout=60)
        ledger_url = f"sqlite:///{work / 'var' / 'ledger.sqlite'}"
        watcher = Watcher(ledger_url, pacs, fhir.base_url)
        watcher.start()

        def files(p: object) -> list[Path]:
            return sorted(Path(p.study_dir).glob("*.dcm"))  # type: ignore[attr-defined]

        t0 = time.monotonic()
        send(files(cohort[0]), port, "BENCHPACS")
        warm = Sent(cohort[0].study_instance_uid, time.time(), time.monotonic())
        watcher.add(warm)
        while not warm.done and warm.state != "dead" and time.monotonic() - t0 < args.timeout:
            time.sleep(0.1)
        if not warm.done:
            print(f"warm-up study did not finish (state {warm.state or 'none'}; see {work / 'serve.log'})",
                  file=sys.stderr)
            return 1
        print(f"warm-up study: {warm.latency:.2f} s (worker start + model load; not counted)")
        with watcher.lock:
            watcher.items.remove(warm)

        normal_patients, urgent_patient = cohort[1:-1], cohort[-1]
        # one association: on its release every normal study becomes a job, queued at once
        send([f for p in normal_patients for f in files(p)], port, "BENCHPACS")
        queued_at = time.monotonic()
        normals = [Sent(p.study_instance_uid, time.time(), queued_at) for p in normal_patients]
        for item in normals:
            watcher.add(item)
        send(files(urgent_patient), port, URGENT_AE)
        urgent = Sent(urgent_patient.study_instance_uid, time.time(), time.monotonic())
        watcher.add(urgent)
        normals_done_at_urgent_send = sum(1 for i in normals if i.done)
        deadline = time.monotonic() + args.timeout
        while watcher.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        watcher.stop_event.set()
        watcher.join()

        def arrived(i: Sent) -> float | None:
            return None if not i.done else max(i.sr_seen, i.report_seen)  # type: ignore[type-var]

        if arrived(urgent) is None:
            print(f"urgent study did not finish (state {urgent.state}; see {work / 'serve.log'})", file=sys.stderr)
            return 1
        from dicom_fusion.service.storage.ledger import Ledger

        ledger = Ledger(ledger_url)
        try:
            jobs = ledger.jobs_for_study(urgent.study_uid)
            priority = jobs[-1].priority if jobs else "?"
        finally:
            ledger.close()
        finished = sorted((t, "urgent" if i is urgent else "normal") for i in [*normals, urgent]
                          if (t := arrived(i)) is not None)
        position = [k for _, k in finished].index("urgent") + 1
        before = position - 1
        normal_times = sorted(t - queued_at for i in normals if (t := arrived(i)) is not None)
        print(f"{len(normals)} normal studies queued at once (one association from BENCHPACS), then 1 study from "
              f"{URGENT_AE} (job priority: {priority}); {args.broker} broker, embedded worker (solo × 1), "
              f"default model with explanations")
        print(f"normal results already in when the urgent study was sent: {normals_done_at_urgent_send}")
        print(f"urgent result: position {position} of {len(finished)}; normal results before it: {before} "
              f"(target: fewer than {TARGET_BEFORE}) → {'meets' if before < TARGET_BEFORE else 'misses'} the target")
        print(f"urgent latency (its last C-STORE → SR in Orthanc + report in FHIR): {urgent.latency:.2f} s")
        if normal_times:
            print(f"normal results after the queue was filled: 1st {normal_times[0]:.2f} s, "
                  f"5th {normal_times[min(4, len(normal_times) - 1)]:.2f} s, median {statistics.median(normal_times):.2f} s, "
                  f"last {normal_times[-1]:.2f} s ({len(normal_times)}/{len(normals)} done)")
        return 0 if before < TARGET_BEFORE and len(normal_times) == len(normals) else 1


if __name__ == "__main__":
    raise SystemExit(main())
