"""Operate it, end to end on real components: `dicom-fusion serve` (Redis broker, embedded worker) and
`dicom-fusion api`; a study sent with DCMTK storescu is then found counted in /api/queues, /metrics,
the listener's and the worker's own metrics, the dashboard rendered by headless Chromium, and
`dicom-fusion status`; `retry` is refused for a done study, `replay` runs it again as version 2, and
`dicom-fusion send` delivers a second study.

Set DICOM_FUSION_SCREENSHOT to a path to keep the dashboard screenshot.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import Browser
from conftest import require, require_tool, stop_process
from prometheus_client.parser import text_string_to_metric_families

from dicom_fusion.fhir.client import FhirClient
from dicom_fusion.inference.synth.generate import SyntheticPatient, generate_cohort
from dicom_fusion.service.demo.components import FhirServer, Pacs, RedisServer, free_port, start_redis
from dicom_fusion.service.server import wait_for_port

pytestmark = [pytest.mark.e2e, pytest.mark.integration]
TOKEN = "e2e-operator-token"
PHI = ("SYNTH^",)  # synthetic patient names; the patient IDs are checked per patient below


@dataclass
class Ops:
    serve: subprocess.Popen[bytes]
    api: subprocess.Popen[bytes]
    dicom_port: int
    api_port: int
    listener_metrics: int
    worker_metrics: int
    env: dict[str, str]
    log: Path
    tmp: Path

    def get(self, path: str, *, auth: bool = True) -> tuple[int, str]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}",
                                     headers={"Authorization": f"Bearer {TOKEN}"} if auth else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def json(self, path: str) -> object:
        status, body = self.get(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def post(self, path: str) -> tuple[int, dict[str, object]]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", method="POST", data=b"",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", *args], env=self.env,
                              capture_output=True, text=True, timeout=120, cwd=self.tmp)

    def wait_job(self, study_uid: str, version: int, timeout: float = 150.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            status, body = self.get(f"/api/studies/{study_uid}")
            if status == 200:
                last = json.loads(body)
                jobs = [j for j in last["jobs"] if j["version"] == version]  # type: ignore[index]
                if jobs and jobs[0]["state"] in ("done", "dead"):
                    return jobs[0]  # type: ignore[no-any-return]
            for p in (self.serve, self.api):
                if p.poll() is not None:
                    raise AssertionError(f"a process exited early:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)
        raise AssertionError(f"job v{version} of {study_uid} not finished: {last}\n{self.log.read_text()[-3000:]}")


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, fhir_server: FhirServer) -> list[SyntheticPatient]:
    patients = generate_cohort(2, tmp_path_factory.mktemp("cohort"), seed=23, progress=False)
    with FhirClient(fhir_server.base_url) as client:
        for p in patients:
            client.transaction(json.loads(Path(p.bundle_path).read_text()))
    return patients


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    require(shutil.which("redis-server") is not None, "redis-server")
    server = start_redis(tmp_path / "redis")
    yield server
    server.stop()




@pytest.fixture
def ops(tmp_path: Path, orthanc: Pacs, fhir_server: FhirServer, redis: RedisServer) -> Iterator[Ops]:
    dicom_port, api_port, lm, wm = free_port(), free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.pop("DICOM_FUSION_CONFIG", None)
    env.update({
        "DICOM_FUSION_DATA_DIR": str(tmp_path / "var"),
        "DICOM_FUSION_BROKER__URL": redis.url,
        "DICOM_FUSION_LISTENER__PORT": str(dicom_port),
        "DICOM_FUSION_PACS__AE_TITLE": orthanc.ae_title,
        "DICOM_FUSION_PACS__PORT": str(orthanc.dicom_port),
        "DICOM_FUSION_FHIR__BASE_URL": fhir_server.base_url,
        "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "1",
        "DICOM_FUSION_METRICS__LISTENER_PORT": str(lm),
        "DICOM_FUSION_METRICS__WORKER_PORT": str(wm),
        "DICOM_FUSION_API__PORT": str(api_port),
        "DICOM_FUSION_API__TOKEN": TOKEN,
        "COLUMNS": "200",
    })
    log = tmp_path / "ops.log"
    with log.open("wb") as fh:
        serve = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=env,
                                 stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    api = None
    try:
        wait_for_port("127.0.0.1", dicom_port, timeout=60)  # serve has migrated the ledger: the api may start
        with log.open("ab") as fh:
            api = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "api"], env=env,
                                   stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
        wait_for_port("127.0.0.1", api_port, timeout=60)
        yield Ops(serve, api, dicom_port, api_port, lm, wm, env, log, tmp_path)
    finally:
        if api is not None:
            stop_process(api)
        stop_process(serve)


def chromium(url: str, tmp: Path, *args: str) -> str:
    exe = require_tool("chromium")
    profile = tmp / "chromium-profile"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1280,900", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _text(html: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', html)
    assert m, f"#{element_id} not in the dashboard"
    return m.group(1).strip()


def test_operator_sees_and_acts_on_a_real_run(ops: Ops, cohort: list[SyntheticPatient], storescu: str,
                                              tmp_path: Path) -> None:
    first, second = cohort
    files = sorted(Path(first.study_dir).glob("*.dcm"))
    subprocess.run([storescu, "-aet", "MODALITY", "-aec", "DFUSION", "127.0.0.1", str(ops.dicom_port),
                    *map(str, files)], check=True, capture_output=True, env=dict(os.environ, TCP_NODELAY="1"))
    job = ops.wait_job(first.study_instance_uid, 1)
    assert job["state"] == "done", job
    uid = first.study_instance_uid

    # health without a token; everything else needs it
    assert ops.get("/healthz", auth=False)[0] == 200
    assert ops.get("/api/queues", auth=False)[0] == 401
    ready = ops.json("/readyz")
    assert ready["ready"] is True, ready  # type: ignore[index]

    # REST: queues drained, a worker answers the ping, the study with its history and deliveries
    queues = ops.json("/api/queues")
    assert queues["broker"] == "redis" and queues["broker_error"] is None  # type: ignore[index]
    assert [(q["depth"], q["waiting"], q["in_flight"]) for q in queues["queues"]] == [(0, 0, 0)] * 3  # type: ignore[index]
    assert queues["workers"] and all(w.startswith("dfusion-") for w in queues["workers"])  # type: ignore[index]
    studies = ops.json("/api/studies?state=done")
    assert [s["study_uid"] for s in studies["items"]] == [uid]  # type: ignore[index]
    detail = ops.json(f"/api/studies/{uid}")
    assert detail["instances"] == len(files)  # type: ignore[index]
    [j1] = detail["jobs"]  # type: ignore[index]
    kinds = {d["kind"]: d["state"] for d in j1["deliveries"]}
    assert (kinds["sr"], kinds["report"]) == ("delivered", "delivered")
    assert set(j1["stage_seconds"]) == {"prepare", "timeline", "infer", "deliver"}
    assert j1["report_url"].startswith(ops.env["DICOM_FUSION_FHIR__BASE_URL"] + "/DiagnosticReport/")

    # Prometheus: the API's ledger-derived metrics, and the listener's and the worker's own
    m = scrape(f"http://127.0.0.1:{ops.api_port}/metrics")
    assert m[("dicom_fusion_instances_received_total", (("result", "stored"),))] == len(files)
    assert m[("dicom_fusion_studies_completed_total", ())] == 1
    assert m[("dicom_fusion_job_latency_seconds_count", ())] == 1
    assert m[("dicom_fusion_deliveries", (("kind", "sr"), ("outcome", "delivered")))] == 1
    assert m[("dicom_fusion_queue_depth", (("queue", "gpu"),))] == 0
    lm = scrape(f"http://127.0.0.1:{ops.listener_metrics}/metrics")
    assert lm[("dicom_fusion_listener_store_responses_total", (("status", "success"),))] == len(files)
    assert lm[("dicom_fusion_listener_associations_total", (("event", "accepted"),))] == 1
    wm = scrape(f"http://127.0.0.1:{ops.worker_metrics}/metrics")
    for stage in ("prepare", "timeline", "infer", "deliver"):
        assert wm[("dicom_fusion_task_duration_seconds_count", (("outcome", "ok"), ("stage", stage)))] >= 1
    assert sum(v for (n, _), v in wm.items() if n == "dicom_fusion_model_inference_seconds_count") == 1

    # The dashboard, as a browser renders it: an operator signs in (no token in any URL), scripts run
    made = subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "users", "add", "olga", "--role",
                           "operator", "--name", "Olga Operator", "--password-stdin"], env=ops.env, cwd=ops.tmp,
                          input="operator password 1\n", capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    browser = Browser(tmp_path / "chromium")
    try:
        base = f"http://127.0.0.1:{ops.api_port}"
        browser.goto(f"{base}/dashboard?study={uid}")
        assert "/login" in browser.url and browser.eval("!!document.getElementById('password')")
        browser.eval("document.getElementById('username').value = 'olga';"
                     "document.getElementById('password').value = 'operator password 1';")
        browser.submit_and_wait("document.getElementById('login').submit()")
        assert browser.url == f"{base}/dashboard?study={uid}"
        assert browser.eval("!!document.getElementById('study-state')"), browser.eval("document.body.innerText")[:3000]
        shot = Path(os.environ.get("DICOM_FUSION_SCREENSHOT") or tmp_path / "dashboard.png")
        browser.screenshot(shot)
        assert shot.stat().st_size > 20_000
        dom = browser.eval("document.documentElement.outerHTML")
    finally:
        browser.close()
    assert _text(dom, "kpi-done") == "1"
    assert _text(dom, "kpi-instances") == str(len(files))
    assert _text(dom, "kpi-failing") == "0"
    assert re.search(r'data-state="done"><span class="badge done">done</span><span class="n">1<', dom)
    assert re.search(r'data-queue="gpu">.*?class="num depth">0<', dom, re.S)
    assert _text(dom, "study-uid") == uid and _text(dom, "study-state") == "done"
    assert f'data-study="{uid}"' in dom and "Olga Operator" in dom
    login = chromium(f"http://127.0.0.1:{ops.api_port}/dashboard", tmp_path / "fresh", "--dump-dom")
    assert 'name="password"' in login and "kpi-done" not in login

    # CLI status shows the same
    status = ops.cli("status")
    assert status.returncode == 0, status.stderr
    assert uid in status.stdout and re.search(r"│ done\s+│\s+1 │", status.stdout), status.stdout
    assert re.search(r"│ cpu\s+│\s+0 │", status.stdout) and "workers online: dfusion-" in status.stdout

    # Actions: retry refused for a done study (CLI and API); replay makes version 2
    retry = ops.cli("retry", uid)
    assert retry.returncode == 1 and "use replay" in retry.stderr
    assert ops.post(f"/api/studies/{uid}/retry")[0] == 409
    replay = ops.cli("replay", uid)
    assert replay.returncode == 0 and "job v2 created" in replay.stdout, replay.stderr
    assert ops.wait_job(uid, 2)["state"] == "done"

    # `dicom-fusion send` delivers the second study
    sent = ops.cli("send", str(second.study_dir), "--port", str(ops.dicom_port), "--aet", "ADMIN")
    assert sent.returncode == 0 and f"sent {len(list(Path(second.study_dir).glob('*.dcm')))}" in sent.stdout, \
        sent.stderr
    assert ops.wait_job(second.study_instance_uid, 1)["state"] == "done"
    m = scrape(f"http://127.0.0.1:{ops.api_port}/metrics")
    assert m[("dicom_fusion_studies_completed_total", ())] == 3
    assert m[("dicom_fusion_jobs_created_total", ())] == 3

    # No patient data in what operators see
    seen = [ops.get(f"/api/studies/{uid}")[1], ops.get("/api/overview")[1], ops.get("/api/studies")[1], dom,
            status.stdout, ops.log.read_text()]
    for text in seen:
        for phi in (*PHI, first.patient_id, second.patient_id):
            assert phi not in text
    assert f"token={TOKEN}" not in ops.log.read_text()  # the access log redacts the dashboard token
