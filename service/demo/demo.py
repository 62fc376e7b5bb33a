"""`dicom-fusion demo`: the whole loop on one machine with real components.

Generates a synthetic cohort, starts a FHIR server (sekmet-fhir) loaded with the patients' EHR
bundles, a PACS (Orthanc, else a pynetdicom SCP), and ``dicom-fusion serve`` with its embedded worker
and embedded broker; sends each study with DCMTK ``storescu`` (else our SCU); waits for every job;
prints a table and saves each SR and DiagnosticReport under ``<out>/results``. Ends by itself.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from dicom_fusion.service.demo.components import Component, Pacs, free_port, start_fhir_server, start_pacs
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Job, JobState

MARKER = ".dicom-fusion-demo"
STORESCU = "/usr/bin/storescu"  # DCMTK's; the venv's pynetdicom `storescu` would shadow it on PATH
console = Console(width=None if sys.stdout.isatty() else 140)


def _fresh_dir(out: Path) -> None:
    if out.exists():
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and is not a demo folder; pass --out to another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by dicom-fusion demo; deleted by the next run\n")


def send_study(files: list[Path], *, port: int, called_ae: str, calling_ae: str = "DEMO-PACS") -> None:
    """Send one study in one association, the way a PACS node would."""
    if Path(STORESCU).exists():
        env = dict(os.environ, TCP_NODELAY="1")
        subprocess.run([STORESCU, "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port),
                        *map(str, files)], check=True, env=env, capture_output=True)
        return
    from dicom_fusion.service.outputs.dispatch import DicomNode, store_to_pacs

    store_to_pacs(list(files), DicomNode(called_ae, "127.0.0.1", port), calling_ae=calling_ae)


def _serve_env(out: Path, port: int, pacs: Pacs, fhir_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "DICOM_FUSION_DATA_DIR": str(out / "var"),
        "DICOM_FUSION_LISTENER__HOST": "127.0.0.1",
        "DICOM_FUSION_LISTENER__PORT": str(port),
        "DICOM_FUSION_PACS__AE_TITLE": pacs.ae_title,
        "DICOM_FUSION_PACS__HOST": "127.0.0.1",
        "DICOM_FUSION_PACS__PORT": str(pacs.dicom_port),
        "DICOM_FUSION_FHIR__BASE_URL": fhir_url,
        "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "2",
        "DICOM_FUSION_WORKER__EMBEDDED": "true",
    })
    env.pop("DICOM_FUSION_CONFIG", None)
    return env


def run_demo(*, patients: int = 4, out: Path = Path("demo-output"), seed: int = 7,
             timeout: float = 240.0) -> int:
    from dicom_fusion.fhir.client import FhirClient
    from dicom_fusion.inference.synth.generate import generate_cohort

    out = out.resolve()
    _fresh_dir(out)
    started: list[Component] = []
    serve_proc: subprocess.Popen[bytes] | None = None
    try:
        console.rule("[bold]dicom-fusion demo")
        cohort = generate_cohort(patients, out / "cohort", seed, progress=True)
        fhir = start_fhir_server(out / "fhir")
        started.append(fhir)
        console.print(f"FHIR server (sekmet-fhir) at {fhir.base_url}")
        with FhirClient(fhir.base_url) as client:
            for p in cohort:
                client.transaction(json.loads(Path(p.bundle_path).read_text()))
        console.print(f"loaded {len(cohort)} EHR bundles into the FHIR server")
        pacs = start_pacs(out / "pacs")
        started.append(pacs)
        kind = "Orthanc" if pacs.is_orthanc else "pynetdicom storage SCP"
        console.print(f"PACS ({kind}) {pacs.ae_title}@127.0.0.1:{pacs.dicom_port}")
        port = free_port()
        log = (out / "serve.log").open("wb")
        serve_proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"],
                                      env=_serve_env(out, port, pacs, fhir.base_url), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=out)
        wait_for_port("127.0.0.1", port, timeout=60)
        console.print(f"dicom-fusion listening as DFUSION@127.0.0.1:{port} (log: {out / 'serve.log'})")
        sent_at: dict[str, float] = {}
        with Progress(console=console) as progress:
            task = progress.add_task("sending studies (storescu)", total=len(cohort))
            for p in cohort:
                send_study(sorted(Path(p.study_dir).glob("*.dcm")), port=port, called_ae="DFUSION")
                sent_at[p.study_instance_uid] = time.monotonic()
                progress.advance(task)
        ledger = Ledger(f"sqlite:///{out / 'var' / 'ledger.sqlite'}")
        finished: dict[str, Job] = {}
        deadline = time.monotonic() + timeout
        with Progress(console=console) as progress:
            task = progress.add_task("waiting for SR + DiagnosticReport", total=len(cohort))
            while len(finished) < len(cohort) and time.monotonic() < deadline:
                for p in cohort:
                    if p.study_instance_uid in finished:
                        continue
                    jobs = ledger.jobs_for_study(p.study_instance_uid)
                    if jobs and jobs[-1].state in (JobState.DONE, JobState.DEAD):
                        finished[p.study_instance_uid] = jobs[-1]
                        progress.advance(task)
                time.sleep(0.3)
        return _report(out, cohort, ledger, pacs, fhir.base_url, finished)
    finally:
        if serve_proc is not None and serve_proc.poll() is None:
            serve_proc.send_signal(signal.SIGTERM)
            try:
                serve_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve_proc.kill()
        for c in reversed(started):
            c.stop()


def _report(out: Path, cohort: list[Any], ledger: Ledger, pacs: Pacs, fhir_url: str,
            finished: dict[str, Job]) -> int:
    from dicom_fusion.fhir.client import FhirClient

    results = out / "results"
    table = Table(title="dicom-fusion demo results")
    for col in ("patient", "truth", "finding", "p", "EHR used", "SR in PACS", "DiagnosticReport", "state"):
        table.add_column(col)
    ok = 0
    with FhirClient(fhir_url) as client:
        for p in cohort:
            job = finished.get(p.study_instance_uid)
            if job is None:
                table.add_row(p.patient_id, str(p.label), "-", "-", "-", "-", "-", "[red]timeout")
                continue
            d = out / "var" / "spool" / "jobs" / f"{job.id:08d}"
            dest = results / p.patient_id
            dest.mkdir(parents=True, exist_ok=True)
            deliveries = {x.kind: x for x in ledger.deliveries(job.id)}
            sr = deliveries.get("sr")
            rep = deliveries.get("report")
            if (d / "sr.dcm").exists():
                shutil.copy(d / "sr.dcm", dest / "sr.dcm")
            report_ref = rep.remote_id if rep and rep.remote_id else "-"
            if rep and rep.remote_id:
                rtype, rid = rep.remote_id.split("/", 1)
                (dest / "diagnostic-report.json").write_text(json.dumps(client.read(rtype, rid), indent=2))
            in_pacs = sr.state if sr else "-"
            if sr and sr.state == "delivered" and pacs.is_orthanc:
                in_pacs = "stored" if job.sr_uid and pacs.instance_count(job.sr_uid) else "missing"
            state = str(job.state)
            if state == JobState.DONE:
                ok += 1
            table.add_row(p.patient_id, str(p.label), str(job.finding),
                          f"{job.probability:.2f}" if job.probability is not None else "-",
                          "no" if job.image_only else "yes", in_pacs, report_ref,
                          state if state == JobState.DONE else f"[red]{state}: {job.error}")
    console.print(table)
    console.print(f"SRs and DiagnosticReports saved under {results}")
    console.print(f"{ok}/{len(cohort)} studies returned an SR and a DiagnosticReport")
    return 0 if ok == len(cohort) else 1

