"""Model cache: the infer stage of the first and later studies on each model, with the cache and without.

    .venv/bin/python bench/model_cache.py [--studies 3] [--seed 17] [--ct]

The full stack on loopback (as bench/latency.py, embedded broker): Orthanc, sekmet-fhir, ``dicom-fusion
serve`` with its embedded worker. Two routes with `continue`, so every radiograph gets one job per model:
the shipped model and a second model (its card copied under another name, the same weights: another
model to the service, loaded separately). Studies are sent one at a time, each after the previous one's
jobs are done. The infer stage's run time of each job comes from the ledger's audit rows; it includes
loading the model when the worker has not got it. Two runs: ``worker.max_loaded_models = 4`` (both
models stay loaded after first use) and ``= 1`` (each job evicts the other model: every study loads).
The first study of the first run also pays torch's import in the fresh worker.

``--ct``: the two models are the shipped radiograph model and the shipped chest CT model, with no route
file (the implicit routes `default` and `chest-ct`); the studies alternate radiograph and chest CT, each
read by its own model (one job per study), so with one slot every study loads its model again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack import BenchStack  # noqa: E402
from latency import STORESCU, Sent, breakdown, send_study  # noqa: E402

ROUTES = """
[[routes]]
name = "xr-shipped"
model = "default"
continue = true
[routes.match]
Modality = ["DX", "CR"]

[[routes]]
name = "xr-second"
model = "{second}"
[routes.match]
Modality = ["DX", "CR"]
"""


def second_card(folder: Path) -> Path:
    from dicom_fusion.inference.card.model import load_card, write_card
    from dicom_fusion.service.config import load_settings

    card = load_card(load_settings(data_dir=folder / "var").model_card_path())
    folder.mkdir(parents=True, exist_ok=True)
    write_card(dataclasses.replace(card, name="dfusion-second-opinion", path=folder / "card.toml"),
               folder / "card.toml")
    return folder / "card.toml"


def loads(log: Path) -> list[float]:
    """Seconds of each model load the worker logged (`model cache: loaded …`; classifier and segmenter)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if "model cache: loaded " in line:
            out.append(float(line.rsplit(" in ", 1)[1].split()[0]))
    return out


def run(work: Path, cohort: list[object], fhir_url: str, pacs: object, max_loaded: int,
        timeout: float, *, ct: bool = False) -> dict[str, list[float]]:
    """model -> infer run seconds of its job on each study, in order. `ct`: the implicit routes (one job
    per study, on the radiograph or the chest CT model), else the two radiograph routes (two jobs)."""
    from dicom_fusion.service.demo.components import free_port
    from dicom_fusion.service.server import wait_for_port
    from dicom_fusion.service.storage.ledger import Ledger

    work.mkdir(parents=True, exist_ok=True)
    routes = work / "routes.toml"
    routes.write_text("" if ct else ROUTES.format(second=second_card(work / "second")))  # "": implicit routes
    jobs_per_study = 1 if ct else 2
    port = free_port()
    env = dict(os.environ, DICOM_FUSION_DATA_DIR=str(work / "var"), DICOM_FUSION_LISTENER__PORT=str(port),
               DICOM_FUSION_PACS__AE_TITLE=pacs.ae_title, DICOM_FUSION_PACS__PORT=str(pacs.dicom_port),  # type: ignore[attr-defined]
               DICOM_FUSION_FHIR__BASE_URL=fhir_url, DICOM_FUSION_COMPLETION__ON_RELEASE="true",
               DICOM_FUSION_COMPLETION__QUIET_SECONDS="600", DICOM_FUSION_LOG_LEVEL="INFO",
               DICOM_FUSION_ROUTING__FILE=str(routes), DICOM_FUSION_WORKER__MAX_LOADED_MODELS=str(max_loaded))
    for key in ("DICOM_FUSION_CONFIG", "DICOM_FUSION_BROKER__URL"):
        env.pop(key, None)
    log = (work / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ledger_url = f"sqlite:///{work / 'var' / 'ledger.sqlite'}"
    out: dict[str, list[float]] = {}
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        ledger = Ledger(ledger_url)
        for p in cohort:
            send_study(sorted(Path(p.study_dir).glob("*.dcm")), port)  # type: ignore[attr-defined]
            deadline = time.monotonic() + timeout
            while True:
                jobs = ledger.jobs_for_study(p.study_instance_uid)  # type: ignore[attr-defined]
                if len(jobs) == jobs_per_study and all(str(j.state) in ("done", "dead") for j in jobs):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"study not done in {timeout:.0f} s (see {work / 'serve.log'})")
                time.sleep(0.1)
            for j in jobs:
                if str(j.state) != "done":
                    raise RuntimeError(f"job {j.id} {j.state}: {j.error}")
                item = Sent(p.study_instance_uid, time.time(), time.monotonic(), job_id=j.id)  # type: ignore[attr-defined]
                out.setdefault(j.model, []).append(breakdown(ledger_url, item)["infer: run"])
        ledger.close()
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here (logs, ledgers)")
    ap.add_argument("--ct", action="store_true",
                    help="radiograph + chest CT model (implicit routes; studies alternate DX and CT)")
    args = ap.parse_args()
    if not Path(STORESCU).exists():
        print(f"{STORESCU} missing: run `make sysdeps`", file=sys.stderr)
        return 2
    from dicom_fusion.inference.synth.generate import generate_cohort, generate_patient

    with BenchStack(args.keep, "bench-model-cache-") as stack:
        work = stack.work
        cohort = generate_cohort(2 * args.studies, work / "cohort", args.seed, progress=False)
        if args.ct:  # each DX study followed by a chest CT of its own patient number (FHIR ids after the DX ones)
            cts = [generate_patient(2 * args.studies + k + 1, work / "cohort", args.seed, modality="CT")
                   for k in range(2 * args.studies)]
            cohort = [p for pair in zip(cohort, cts, strict=True) for p in pair]
        fhir, pacs = stack.peers(cohort)
        per_run = 2 * args.studies if args.ct else args.studies  # studies sent per run
        results = {}
        for i, max_loaded in enumerate((4, 1)):
            studies = cohort[i * per_run:(i + 1) * per_run]
            results[max_loaded] = run(work / f"run-max{max_loaded}", studies, fhir.base_url, pacs, max_loaded,
                                      args.timeout, ct=args.ct)
        if args.ct:
            print(f"infer stage run time per job (s), from the ledger; {args.studies} DX and {args.studies} chest "
                  "CT studies sent one after the other, alternating, each read by its own model (implicit "
                  "routes); embedded worker (solo × 1), CPU")
        else:
            print(f"infer stage run time per job (s), from the ledger; {args.studies} DX studies sent one after "
                  "the other, each read by two models (routes with continue); embedded worker (solo × 1), CPU")
        header = "".join(f"{f'study {k + 1}':>10}" for k in range(args.studies))
        for max_loaded, per_model in results.items():
            print(f"worker.max_loaded_models = {max_loaded}")
            print(f"  {'model':<36}{header}{'later/first':>13}")
            for model, times in per_model.items():
                later = statistics.median(times[1:]) if len(times) > 1 else float("nan")
                print(f"  {model:<36}{''.join(f'{t:>10.3f}' for t in times)}{later / times[0]:>13.3f}")
            loaded = loads(work / f"run-max{max_loaded}" / "serve.log")
            print(f"  model loads in the worker (classifier or segmenter): {len(loaded)}, "
                  f"{sum(loaded):.2f} s in all (each {', '.join(f'{x:.2f}' for x in loaded)})")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
