"""`dicom-fusion demo`: the whole loop on one machine with real components.

Generates a synthetic cohort (radiographs, plus one chest CT), starts a FHIR server (sekmet-fhir)
loaded with the patients' EHR bundles, a PACS (Orthanc, else a pynetdicom SCP), and ``dicom-fusion
serve`` with its embedded worker and embedded broker and no route configured (the implicit routes:
radiographs to the radiograph model, chest CT to the CT model); sends each study, and an MR that no
route takes, with DCMTK ``storescu`` (else our SCU); waits for every job; prints a table (route, model
and result per study) and saves each SR and DiagnosticReport under ``<out>/results``. Ends by itself.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

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


@dataclass(frozen=True)
class DemoStudy:
    """One study the demo sends, and what it expects of it."""

    name: str  # the patient id, or the test file's name
    kind: str  # DX | CT | MR
    study_uid: str
    files: tuple[Path, ...]
    truth: str  # the synthetic label, "-" for the MR
    expect_result: bool  # an SR + DiagnosticReport (DX, CT), else `ignored` (MR)


def _mr_study(folder: Path) -> DemoStudy:
    """pydicom's MR_small as a study of its own (fresh UIDs): no route takes an MR, so it is ignored."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    ds = dcmread(get_testdata_file("MR_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "MR_small.dcm", enforce_file_format=True)
    return DemoStudy("MR_small", "MR", ds.StudyInstanceUID, (folder / "MR_small.dcm",), "-", False)


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
    from dicom_fusion.inference.synth.generate import generate_cohort, generate_patient

    out = out.resolve()
    _fresh_dir(out)
    started: list[Component] = []
    serve_proc: subprocess.Popen[bytes] | None = None
    try:
        console.rule("[bold]dicom-fusion demo")
        cohort = generate_cohort(patients, out / "cohort", seed, progress=True)
        cohort.append(generate_patient(patients + 1, out / "cohort", seed, modality="CT"))  # one chest CT
        studies = [DemoStudy(p.patient_id, "CT" if i == patients else "DX", p.study_instance_uid,
                             tuple(sorted(Path(p.study_dir).glob("*.dcm"))), str(p.label), True)
                   for i, p in enumerate(cohort)]
        studies.append(_mr_study(out / "cohort" / "MR"))
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
        with Progress(console=console) as progress:
            task = progress.add_task("sending studies (storescu)", total=len(studies))
            for st in studies:
                send_study(list(st.files), port=port, called_ae="DFUSION")
                progress.advance(task)
        ledger = Ledger(f"sqlite:///{out / 'var' / 'ledger.sqlite'}")
        finished: dict[str, Job] = {}
        deadline = time.monotonic() + timeout
        with Progress(console=console) as progress:
            task = progress.add_task("waiting for SR + DiagnosticReport (or ignored)", total=len(studies))
            while len(finished) < len(studies) and time.monotonic() < deadline:
                for st in studies:
                    if st.study_uid in finished:
                        continue
                    jobs = ledger.jobs_for_study(st.study_uid)
                    if jobs and jobs[-1].state in (JobState.DONE, JobState.DEAD, JobState.IGNORED):
                        finished[st.study_uid] = jobs[-1]
                        progress.advance(task)
                time.sleep(0.3)
        return _report(out, studies, ledger, pacs, fhir.base_url, finished)
    finally:
        if serve_proc is not None and serve_proc.poll() is None:
            serve_proc.send_signal(signal.SIGTERM)
            try:
                serve_proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve_proc.kill()
        for c in reversed(started):
            c.stop()


def _report(out: Path, studies: list[DemoStudy], ledger: Ledger, pacs: Pacs, fhir_url: str,
            finished: dict[str, Job]) -> int:
    """Print the table; 0 when every DX / CT study got an SR and a DiagnosticReport and the MR was ignored."""
    from dicom_fusion.fhir.client import FhirClient

    results = out / "results"
    table = Table(title="dicom-fusion demo results")
    for col in ("study", "kind", "route", "model", "truth", "finding", "p", "EHR used", "SR in PACS",
                "DiagnosticReport", "state"):
        table.add_column(col, no_wrap=col != "DiagnosticReport")  # the report id is the one cut short
    ok = 0
    ignored: list[str] = []
    with FhirClient(fhir_url) as client:
        for st in studies:
            job = finished.get(st.study_uid)
            if job is None:
                table.add_row(st.name, st.kind, "-", "-", st.truth, "-", "-", "-", "-", "-", "[red]timeout")
                continue
            route, model = job.route or "-", job.model or "-"
            if job.state == JobState.IGNORED:  # the reason is long: printed under the table
                ok += not st.expect_result
                ignored.append(f"{st.name} ({st.kind}) ignored: {job.error}")
                table.add_row(st.name, st.kind, route, model, st.truth, "-", "-", "-", "-", "-",
                              "ignored (below)" if not st.expect_result else "[red]ignored (below)")
                continue
            d = out / "var" / "spool" / "jobs" / f"{job.id:08d}"
            dest = results / st.name
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
            good = state == JobState.DONE and st.expect_result
            ok += good
            table.add_row(st.name, st.kind, route, model, st.truth, str(job.finding),
                          f"{job.probability:.2f}" if job.probability is not None else "-",
                          "no" if job.image_only else "yes", in_pacs, report_ref,
                          state if good else f"[red]{state}: {job.error}")
    console.print(table)
    for line in ignored:
        console.print(line, highlight=False)
    console.print(f"SRs and DiagnosticReports saved under {results}")
    expected = sum(st.expect_result for st in studies)
    console.print(f"{ok}/{len(studies)} studies as expected: {expected} with an SR and a DiagnosticReport "
                  f"(radiographs and the chest CT), {len(studies) - expected} ignored (the MR)")
    return 0 if ok == len(studies) else 1
