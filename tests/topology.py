"""The production topology as separate processes (README "Operating" → "Start each piece"), for
tests/e2e/test_topology.py and tests/faults/test_topology_restarts.py.

PostgreSQL ledger (migrated with `dicom-fusion db upgrade`), Redis broker, two `dicom-fusion serve
--no-worker` listeners on one port (`listener.reuse_port`), one `dicom-fusion worker` per queue (cpu
solo, io threads x4, gpu solo), `dicom-fusion api`, Orthanc and the FHIR server. Every piece runs the
`dicom-fusion` console script with the README's arguments and its own data folder (as on its own host);
they share only the spool folder, the ledger URL and the broker URL. Each piece is its own process
group: kill -9 takes it, and only it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import migrate_ledger
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient
from dicom_fusion.service.demo.components import FhirServer, Pacs, PostgresServer, RedisServer, free_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, Job, JobState, Study

TOKEN = "topology-service-token"
DICOM_FUSION = str(Path(sys.executable).parent / "dicom-fusion")
PHI = ("SYNTH^",)  # synthetic patient names: never in any log

# name -> the README's command line (the api gets --host/--port of this test); the gpu worker runs with
# model.device = auto here (no GPU on the test machines; the README sets cuda on a GPU host)
PIECES: dict[str, list[str]] = {
    "listener-1": ["serve", "--no-worker"],
    "listener-2": ["serve", "--no-worker"],
    "worker-cpu": ["worker", "--queues", "cpu", "--pool", "solo"],
    "worker-io": ["worker", "--queues", "io", "--pool", "threads", "--concurrency", "4"],
    "worker-gpu": ["worker", "--queues", "gpu", "--pool", "solo"],
    "api": ["api", "--host", "127.0.0.1"],
}


@dataclass
class Piece:
    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    cwd: Path
    ready: str  # a log line that says the piece serves
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self, timeout: float = 120.0) -> float:
        """Start and wait until it logs `ready`; returns the seconds that took."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        t0 = time.monotonic()
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen([DICOM_FUSION, *self.args], env=self.env, stdout=fh,
                                         stderr=subprocess.STDOUT, cwd=self.cwd, start_new_session=True)
        self.starts += 1
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            with self.log.open("rb") as fh:
                fh.seek(offset)
                if self.ready.encode() in fh.read():
                    return time.monotonic() - t0
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


@dataclass
class Topology:
    tmp: Path
    pg: PostgresServer
    redis: RedisServer
    pacs: Pacs
    fhir: FhirServer
    dicom_port: int
    api_port: int
    ledger: Ledger
    pieces: dict[str, Piece] = field(default_factory=dict)

    # ---- processes ------------------------------------------------------------------------------
    @classmethod
    def start(cls, tmp: Path, pg: PostgresServer, redis: RedisServer, pacs: Pacs, fhir: FhirServer,
              extra_env: dict[str, str] | None = None,
              piece_env: dict[str, dict[str, str]] | None = None) -> Topology:
        migrate_ledger(pg.url)  # README: `dicom-fusion db upgrade`, once per release, before the processes
        topo = cls(tmp, pg, redis, pacs, fhir, free_port(), free_port(), Ledger(pg.url))
        base = {k: v for k, v in os.environ.items() if not k.startswith("DICOM_FUSION_")}
        base.update({
            "DICOM_FUSION_LEDGER__URL": pg.url,
            "DICOM_FUSION_BROKER__URL": redis.url,
            "DICOM_FUSION_SPOOL__DIR": str(tmp / "spool"),  # the shared spool
            "DICOM_FUSION_LISTENER__PORT": str(topo.dicom_port),
            "DICOM_FUSION_LISTENER__REUSE_PORT": "true",  # two serve processes on one port
            "DICOM_FUSION_PACS__AE_TITLE": pacs.ae_title,
            "DICOM_FUSION_PACS__PORT": str(pacs.dicom_port),
            "DICOM_FUSION_FHIR__BASE_URL": fhir.base_url,
            "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "1",
            "DICOM_FUSION_API__PORT": str(topo.api_port),
            "DICOM_FUSION_API__TOKEN": TOKEN,
            "COLUMNS": "200",
            **(extra_env or {}),
        })
        ready = {"listener": "dicom-fusion listening:", "worker": " ready.", "api": "Uvicorn running on"}
        for name, args in PIECES.items():
            folder = tmp / name
            folder.mkdir(parents=True, exist_ok=True)
            env = dict(base, DICOM_FUSION_DATA_DIR=str(folder / "var"), **(piece_env or {}).get(name, {}))
            if name.startswith("listener"):  # each listener's own counters (associations, responses)
                env["DICOM_FUSION_METRICS__LISTENER_PORT"] = str(free_port())
            topo.pieces[name] = Piece(name, args, env, tmp / f"{name}.log", folder, ready[name.split("-")[0]])
        try:
            for piece in topo.pieces.values():
                piece.start()
        except BaseException:
            topo.stop()
            raise
        return topo

    def stop(self) -> None:
        for piece in reversed(list(self.pieces.values())):
            piece.stop()
        self.ledger.close()

    def check_alive(self) -> None:
        for piece in self.pieces.values():
            if piece.proc is not None and not piece.alive:
                raise AssertionError(f"{piece.name} exited with {piece.proc.returncode}:\n{piece.tail()}")

    def logs_text(self) -> str:
        return "".join(p.log.read_text(errors="replace") for p in self.pieces.values() if p.log.exists())

    # ---- sending --------------------------------------------------------------------------------
    def storescu(self, storescu: str, files: list[Path], calling: str = "TESTPACS") -> subprocess.CompletedProcess[str]:
        """One association (DCMTK storescu) carrying every file; the caller reads the statuses."""
        return subprocess.run([storescu, "-v", "-aet", calling, "-aec", "DFUSION", "127.0.0.1", str(self.dicom_port),
                               *map(str, files)], capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, TCP_NODELAY="1"))

    def send_parallel(self, storescu: str, groups: list[list[Path]]) -> list[subprocess.CompletedProcess[str]]:
        """One association per group, all at once."""
        results: list[subprocess.CompletedProcess[str] | None] = [None] * len(groups)

        def run(i: int) -> None:
            results[i] = self.storescu(storescu, groups[i], calling=f"MODALITY{i + 1}")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(groups))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=320)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    # ---- the ledger, the PACS and the FHIR server ------------------------------------------------
    def job_states(self, study_uids: list[str]) -> dict[str, list[tuple[int, str]]]:
        """study -> [(version, state)] from the ledger."""
        with self.ledger.session() as s:
            rows = s.execute(select(Study.study_uid, Job.version, Job.state).join(Job, Job.study_id == Study.id)
                             .where(Study.study_uid.in_(study_uids))).all()
        out: dict[str, list[tuple[int, str]]] = {uid: [] for uid in study_uids}
        for uid, version, state in rows:
            out[uid].append((version, str(state)))
        return {uid: sorted(v) for uid, v in out.items()}

    def wait_done(self, study_uids: list[str], timeout: float = 240.0) -> float:
        """Until every study has a job and all are done or dead; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        states: dict[str, list[tuple[int, str]]] = {}
        while time.monotonic() < deadline:
            states = self.job_states(study_uids)
            if all(v and all(st in (JobState.DONE, JobState.DEAD) for _, st in v) for v in states.values()):
                return time.monotonic()
            self.check_alive()
            time.sleep(0.3)
        pending = {uid: v for uid, v in states.items() if not v or any(st != JobState.DONE for _, st in v)}
        raise AssertionError(f"not finished after {timeout:.0f}s: {pending}\n"
                             + "\n".join(f"--- {p.name}\n{p.tail(1500)}" for p in self.pieces.values()))

    def sr_count(self, study_uid: str) -> int:
        req = urllib.request.Request(f"{self.pacs.http_url}/tools/lookup", data=study_uid.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            hits = [h for h in json.loads(r.read()) if h["Type"] == "Study"]
        if not hits:
            return 0
        with urllib.request.urlopen(f"{self.pacs.http_url}/studies/{hits[0]['ID']}/series", timeout=10) as r:
            series = json.loads(r.read())
        return sum(len(s["Instances"]) for s in series if s["MainDicomTags"].get("Modality") == "SR")

    def report_count(self, patient: SyntheticPatient) -> int:
        with FhirClient(self.fhir.base_url) as client:
            return len(list(client.search("DiagnosticReport", {"subject": f"Patient/{patient.fhir_id}"})))

    def ledger_counts(self) -> dict[str, int]:
        with self.ledger.session() as s:
            by_state = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
            return {"instances": int(s.scalar(select(func.count()).select_from(Instance)) or 0),
                    "studies": int(s.scalar(select(func.count()).select_from(Study)) or 0),
                    "jobs": int(sum(by_state.values())),
                    **{f"jobs_{k}": int(v) for k, v in by_state.items()}}

    # ---- the API ----------------------------------------------------------------------------------
    def api_get(self, path: str) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def listener_associations(self, name: str) -> float:
        """Associations a listener process accepted, from its own metrics endpoint."""
        port = self.pieces[name].env["DICOM_FUSION_METRICS__LISTENER_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "dicom_fusion_listener_associations_total" and "accept" in str(s.labels))

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.api_get("/metrics")
        assert status == 200, (status, text[:500])
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}


def upload_cohort(fhir: FhirServer, patients: list[SyntheticPatient]) -> None:
    with FhirClient(fhir.base_url) as client:
        for p in patients:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))


def study_files(patient: SyntheticPatient) -> list[Path]:
    return sorted(Path(patient.study_dir).glob("*.dcm"))


def acknowledged(result: subprocess.CompletedProcess[str]) -> int:
    """C-STORE responses with status 0x0000 in a `storescu -v` transcript."""
    return (result.stdout + result.stderr).count("Received Store Response (Success)")
