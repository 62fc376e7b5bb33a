"""Scaling: end-to-end throughput (studies/min) with 1, 2, 4 ... worker processes, PostgreSQL + Redis.

    .venv/bin/python bench/scaling.py [--studies 40] [--workers 1,2,4] [--io-threads 0] [--seed 21] [--keep DIR]
    # a 16-core host with a GPU: --workers 1,2,4,8,16 --studies 400 (GPU workers: DICOM_FUSION_MODEL__DEVICE=cuda)

The production topology on loopback: PostgreSQL as the ledger, Redis as the broker, Orthanc as the PACS,
sekmet-fhir as the EHR, ``dicom-fusion serve --no-worker`` (listener, completion on association release,
reaper) and N separate ``dicom-fusion worker`` processes (solo pool, every queue: cpu, gpu, io), the
default model with explanations. With ``--io-threads K`` the N solo workers take the cpu and gpu queues
only and one more worker takes the io queue (timeline, deliver) with K threads: the topology README
"Scale workers" recommends, since those stages wait on FHIR and the PACS rather than compute. For each N: a fresh database and Redis, N warm-up studies (every worker
loads the model; not counted), then ``--studies`` studies in one association: on its release they all
become jobs at once. Throughput = studies / (release → the last SR in Orthanc and report in FHIR).

Where the time goes, from the ledger's audit rows: mean wait in queue and run time per stage, and the
CPU seconds the workers, ``serve``, PostgreSQL, Redis, Orthanc and the FHIR server used in the window
(``/proc``), against the machine's cores — when the workers' CPU reaches the cores, more workers only
queue; when a stage's queue wait grows while its run time stays flat, that stage is the bottleneck.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import BenchStack  # noqa: E402
from latency import STAGES, STORESCU, Sent, Watcher, breakdown  # noqa: E402

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its waited-for children (/proc/PID/stat); 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / _TICKS


def tree(pid: int) -> list[int]:
    """`pid` and every descendant (PostgreSQL and Orthanc run helper processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_of(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for root in pids for p in tree(root))


def send(files: list[Path], port: int) -> None:
    subprocess.run([STORESCU, "-aet", "BENCHPACS", "-aec", "DFUSION", "127.0.0.1", str(port), *map(str, files)],
                   check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))


@dataclass
class Row:
    workers: int
    studies: int
    done: int
    seconds: float
    cpu: dict[str, float]
    stages: dict[str, float]

    @property
    def per_minute(self) -> float:
        return self.done / self.seconds * 60 if self.seconds > 0 else 0.0


def run(n_workers: int, cohort: list, warm: list, stack: BenchStack, fhir: object, pacs: object,
        timeout: float, io_threads: int = 0) -> Row:
    from dicom_fusion.service.demo.components import free_port, start_postgres, start_redis
    from dicom_fusion.service.server import wait_for_port

    work = stack.work / f"workers-{n_workers}"
    postgres = start_postgres(work / "postgres")  # a fresh cluster per run: nothing carried over
    ledger_url = postgres.url
    redis = start_redis(work / "redis")
    port = free_port()
    env = dict(os.environ, DICOM_FUSION_DATA_DIR=str(work / "var"), DICOM_FUSION_LISTENER__PORT=str(port),
               DICOM_FUSION_PACS__AE_TITLE=pacs.ae_title, DICOM_FUSION_PACS__PORT=str(pacs.dicom_port),  # type: ignore[attr-defined]
               DICOM_FUSION_FHIR__BASE_URL=fhir.base_url, DICOM_FUSION_COMPLETION__MODE="release",  # type: ignore[attr-defined]
               DICOM_FUSION_COMPLETION__QUIET_SECONDS="600", DICOM_FUSION_LOG_LEVEL="WARNING",
               DICOM_FUSION_LEDGER__URL=ledger_url, DICOM_FUSION_BROKER__URL=redis.url,
               DICOM_FUSION_WORKER__TORCH_THREADS="1")
    env.pop("DICOM_FUSION_CONFIG", None)
    (work / "var").mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "db", "upgrade"], env=env, check=True,
                       capture_output=True)
        log = (work / "serve.log").open("wb")
        serve = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve", "--no-worker"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(serve)
        wait_for_port("127.0.0.1", port, timeout=60)
        worker = [sys.executable, "-m", "dicom_fusion.service.cli", "worker"]
        for i in range(n_workers):
            wlog = (work / f"worker-{i}.log").open("wb")
            procs.append(subprocess.Popen(
                [*worker, "--queues", "cpu,gpu" if io_threads else "cpu,gpu,io", "--pool", "solo"], env=env,
                stdout=wlog, stderr=subprocess.STDOUT, start_new_session=True))
        if io_threads:
            procs.append(subprocess.Popen(
                [*worker, "--queues", "io", "--pool", "threads", "--concurrency", str(io_threads)], env=env,
                stdout=(work / "worker-io.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True))
        watcher = Watcher(ledger_url, pacs, fhir.base_url)  # type: ignore[attr-defined]
        watcher.start()
        try:
            send([f for p in warm for f in sorted(Path(p.study_dir).glob("*.dcm"))], port)
            warming = [Sent(p.study_instance_uid, time.time(), time.monotonic()) for p in warm]
            for item in warming:
                watcher.add(item)
            deadline = time.monotonic() + timeout
            while watcher.pending() and time.monotonic() < deadline:
                time.sleep(0.1)
            if watcher.pending():
                raise RuntimeError(f"warm-up studies did not finish; see {work}")
            with watcher.lock:
                watcher.items.clear()
            peers = [pid for c in (postgres, redis, pacs, fhir) if (pid := c.pid) is not None]  # type: ignore[attr-defined]
            before = {"workers": cpu_of([p.pid for p in procs[1:]]), "serve": cpu_of([serve.pid]),
                      "peers": cpu_of(peers)}
            send([f for p in cohort for f in sorted(Path(p.study_dir).glob("*.dcm"))], port)
            released = time.monotonic()
            items = [Sent(p.study_instance_uid, time.time(), released) for p in cohort]
            for item in items:
                watcher.add(item)
            deadline = time.monotonic() + timeout
            while watcher.pending() and time.monotonic() < deadline:
                time.sleep(0.1)
            finished = [max(i.sr_seen, i.report_seen) for i in items if i.done]  # type: ignore[type-var]
            seconds = (max(finished) - released) if finished else timeout
            after = {"workers": cpu_of([p.pid for p in procs[1:]]), "serve": cpu_of([serve.pid]),
                     "peers": cpu_of(peers)}
        finally:
            watcher.stop_event.set()
            watcher.join()
        parts = [breakdown(ledger_url, i) for i in items if i.done]
        stages = {}
        for stage in STAGES:
            for kind in ("wait in queue", "run"):
                values = [p[f"{stage}: {kind}"] for p in parts if f"{stage}: {kind}" in p]
                if values:
                    stages[f"{stage}: {kind}"] = statistics.mean(values)
        return Row(n_workers, len(items), len(finished), seconds,
                   {k: after[k] - before[k] for k in after}, stages)
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, 15)
            except ProcessLookupError:
                pass
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        redis.stop()
        postgres.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=40, help="studies per run (sent at once)")
    ap.add_argument("--workers", default="1,2,4", help="worker process counts to run, comma-separated")
    ap.add_argument("--io-threads", type=int, default=0,
                    help="0: every worker takes every queue; K: one more worker, io queue only, K threads")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before giving up")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here (logs, databases)")
    args = ap.parse_args()
    counts = [int(v) for v in args.workers.split(",") if v.strip()]
    if not counts or min(counts) < 1:
        ap.error("--workers takes positive integers, e.g. 1,2,4")
    if not Path(STORESCU).exists():
        print(f"{STORESCU} missing: run `make sysdeps`", file=sys.stderr)
        return 2
    from dicom_fusion.inference.synth.generate import generate_cohort
    from dicom_fusion.service.demo.components import postgres_bindir

    if postgres_bindir() is None:
        print("PostgreSQL server programs missing: run `make sysdeps`", file=sys.stderr)
        return 2
    rows: list[Row] = []
    with BenchStack(args.keep, "bench-scaling-") as stack:
        per_run = args.studies + max(counts)
        everyone = generate_cohort(per_run * len(counts), stack.work / "cohort", args.seed, progress=True)
        fhir, pacs = stack.peers(everyone)
        for k, n in enumerate(counts):
            chunk = everyone[k * per_run:(k + 1) * per_run]
            row = run(n, chunk[n:n + args.studies], chunk[:n], stack, fhir, pacs, args.timeout, args.io_threads)
            rows.append(row)
            print(f"{n} worker(s): {row.done}/{row.studies} studies in {row.seconds:.1f} s = "
                  f"{row.per_minute:.1f} studies/min", flush=True)
    cores = os.cpu_count() or 1
    topology = (f"N × `worker --queues cpu,gpu --pool solo` + 1 × `worker --queues io --pool threads "
                f"--concurrency {args.io_threads}`" if args.io_threads else "N × `worker --pool solo` (every queue)")
    print(f"\n{args.studies} studies released at once; PostgreSQL + Redis; {topology}; default model with "
          f"explanations; {cores} cores")
    base = rows[0].per_minute or 1.0
    header = ["workers", "studies/min", "× 1 worker", "CPU workers", "CPU serve", "CPU peers", "busy cores",
              *(f"{s} wait/run s" for s in STAGES)]
    print(" | ".join(header))
    for r in rows:
        busy = sum(r.cpu.values()) / r.seconds if r.seconds > 0 else 0.0
        stage_cells = [f"{r.stages.get(f'{s}: wait in queue', float('nan')):.2f}/{r.stages.get(f'{s}: run', float('nan')):.2f}"
                       for s in STAGES]
        print(" | ".join([str(r.workers), f"{r.per_minute:.1f}", f"{r.per_minute / base:.2f}",
                          f"{r.cpu['workers']:.0f} s", f"{r.cpu['serve']:.0f} s", f"{r.cpu['peers']:.0f} s",
                          f"{busy:.2f} of {cores}", *stage_cells]))
    return 0 if all(r.done == r.studies for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
