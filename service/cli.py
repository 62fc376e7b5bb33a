"""`dicom-fusion` command line (typer)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from dicom_fusion.service.cliopts import ConfigOpt, settings_or_exit
from dicom_fusion.service.config import redact_url
from dicom_fusion.service.dbcli import db_app
from dicom_fusion.service.errors import ServiceError
from dicom_fusion.service.reviewcli import review_app
from dicom_fusion.service.routescli import routes_app
from dicom_fusion.service.segcli import segment_app
from dicom_fusion.service.userscli import users_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DICOM/PACS integration service: studies in, DICOM SR + FHIR DiagnosticReport out.")
model_app = typer.Typer(no_args_is_help=True, help="Model checkpoints and cards.")
app.add_typer(model_app, name="model")
app.add_typer(segment_app, name="segment")
app.add_typer(db_app, name="db")
app.add_typer(routes_app, name="routes")
app.add_typer(review_app, name="review")
app.add_typer(users_app, name="users")
console = Console(stderr=True, soft_wrap=True)  # error messages never wrap: paths stay whole, whatever the width



@app.command()
def serve(config: ConfigOpt = None,
          worker: Annotated[Optional[bool], typer.Option("--worker/--no-worker",
                            help="Start an embedded worker (default: worker.embedded).")] = None) -> None:
    """Run the DICOM listener, study completion, the lease reaper and (by default) a worker."""
    from dicom_fusion.service.server import serve as _serve
    from dicom_fusion.service.telemetry import configure_logging

    settings = settings_or_exit(config)
    configure_logging(settings.log_level)
    try:
        _serve(settings, config=config, worker=worker)
    except ServiceError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@app.command(hidden=True)
def listen(config: ConfigOpt = None) -> None:
    """An extra listener process on serve's port (started by serve when listener.processes > 1)."""
    from dicom_fusion.service.server import listen as _listen
    from dicom_fusion.service.telemetry import configure_logging

    settings = settings_or_exit(config)
    configure_logging(settings.log_level)
    _listen(settings)


@app.command()
def worker(config: ConfigOpt = None,
           queues: Annotated[Optional[str], typer.Option(help="Comma-separated queues: cpu,gpu,io.")] = None,
           concurrency: Annotated[Optional[int], typer.Option(help="Worker processes/threads.")] = None,
           pool: Annotated[Optional[str], typer.Option(help="solo | prefork | threads")] = None) -> None:
    """Run a Celery worker for the given queues."""
    from dicom_fusion.service.server import run_worker
    from dicom_fusion.service.telemetry import configure_logging

    settings = settings_or_exit(config)
    configure_logging(settings.log_level)
    qs = [q.strip() for q in queues.split(",")] if queues else None
    unknown = set(qs or []) - {"cpu", "gpu", "io"}
    if unknown:
        console.print(f"[red]error:[/red] unknown queue(s) {sorted(unknown)}; use cpu, gpu, io")
        raise typer.Exit(2)
    try:
        run_worker(settings, queues=qs, concurrency=concurrency, pool=pool)
    except ServiceError as exc:  # e.g. the ledger schema is older than this release: says what to run
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@app.command()
def synth(patients: Annotated[int, typer.Option(min=1, help="Number of synthetic patients.")] = 10,
          out: Annotated[Path, typer.Option(help="Output folder.")] = Path("synthetic"),
          seed: Annotated[int, typer.Option(help="Random seed (same seed, same cohort).")] = 0,
          modality: Annotated[str, typer.Option(
              help="DX: 1-2 radiographs per study; CT: a small chest CT volume (32 x 96 x 96).")] = "DX") -> None:
    """Write a synthetic paired cohort: DICOM studies + one FHIR transaction Bundle per patient, and the
    exact lesion mask of each study (<patient>/mask.npy)."""
    from dicom_fusion.inference.synth.generate import MODALITIES, generate_cohort

    if modality.upper() not in MODALITIES:
        console.print(f"[red]error:[/red] --modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
        raise typer.Exit(2)
    cohort = generate_cohort(patients, out, seed, progress=True, modality=modality.upper())
    console.print(f"wrote {len(cohort)} patients to {out}")


@model_app.command("init")
def model_init(out: Annotated[Path, typer.Option(help="Folder for card.toml + weights.")],
               seed: Annotated[int, typer.Option(help="Seed of the deterministic weights.")] = 0) -> None:
    """Write a deterministic (untrained) checkpoint and its model card."""
    from dicom_fusion.inference.nets.hybrid import init_model

    card = init_model(out, seed)
    console.print(f"model {card.name} {card.version} written to {card.path} (sha256 {card.sha256[:12]}…)")


@model_app.command("card")
def model_card(path: Annotated[Optional[Path], typer.Argument(
        help="A model card (card.toml); default: the packaged one.")] = None) -> None:
    """Print a model card as a readable document: intended use, training data, metrics with confidence
    intervals, calibration, threshold, indeterminate band, limitations."""
    from dicom_fusion.inference.card.document import card_document
    from dicom_fusion.inference.card.model import default_card_path, load_card
    from dicom_fusion.inference.errors import ModelCardError

    try:
        card = load_card(path if path is not None else default_card_path())
    except ModelCardError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    typer.echo(card_document(card))


@model_app.command("reference")
def model_reference(
        card_path: Annotated[Path, typer.Argument(metavar="CARD", help="The model card (card.toml) to write the "
                                                  "reference into; its weights must be beside it.")],
        cohort: Annotated[Path, typer.Option(help="The cohort the model was validated on: cohort.csv, "
                                             "<patient>/study/*.dcm, <patient>/bundle.json (as `dicom-fusion "
                                             "synth` writes it).")],
        bins: Annotated[int, typer.Option(min=2, max=50, help="Bins per continuous item (quantile edges).")] = 10,
        window: Annotated[int, typer.Option(min=10, help="Recent jobs the service compares with the reference.")]
        = 200,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto") -> None:
    """Run the card's model over a cohort and write the drift reference (README "Drift") into the card: the
    distribution of image intensity, timeline coverage and values and the predicted probability, which the
    service compares its recent jobs with."""
    import dataclasses

    from dicom_fusion.fhir.events import events_from_bundle
    from dicom_fusion.inference.card.model import write_card
    from dicom_fusion.inference.errors import InferenceError
    from dicom_fusion.inference.serve.drift_items import reference_from_cohort
    from dicom_fusion.inference.serve.predict import Predictor

    try:
        predictor = Predictor.load(card_path, device=device)
        reference = reference_from_cohort(predictor, cohort, read_events=events_from_bundle, bins=bins,
                                          window=window, progress=True)
        write_card(dataclasses.replace(predictor.card, drift=reference), predictor.card.path)
    except (InferenceError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"drift reference of {len(reference.items)} items from {reference.source} written to "
                  f"{predictor.card.path} (window {reference.window} jobs)")


@model_app.command("compare")
def model_compare(
        ensemble: Annotated[Path, typer.Option(help="The ensemble card (train.toml `ensemble = true` writes "
                                               "<out>/ensemble/card.toml).")],
        cohort: Annotated[Path, typer.Option(help="A cohort none of the networks saw (e.g. `dicom-fusion synth "
                                             "--seed 11`), as `dicom-fusion synth` writes it.")],
        out: Annotated[Path, typer.Option(help="Folder for ensemble.md and ensemble.json.")],
        single: Annotated[Optional[Path], typer.Option(help="The single model's card; default: the packaged "
                                                       "one.")] = None,
        spread_quantile: Annotated[float, typer.Option(min=0.5, max=0.999, help="Quantile of the members' "
                                                       "spread taken as the card's max_spread.")] = 0.95,
        write_max_spread: Annotated[bool, typer.Option(help="Write the chosen max_spread into the ensemble "
                                                       "card's [ensemble] table.")] = False,
        device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu") -> None:
    """Single network or fold ensemble, measured on a fresh cohort: ROC-AUC, ECE, time per study, the
    members-disagree limit, and whether the ensemble should be the default (README "Model")."""
    import dataclasses

    from dicom_fusion.fhir.events import events_from_bundle
    from dicom_fusion.inference.card.model import EnsembleSpec, default_card_path, write_card
    from dicom_fusion.inference.data.cohort import load_cohort
    from dicom_fusion.inference.errors import InferenceError
    from dicom_fusion.inference.report.ensemble import compare_ensemble, write_comparison
    from dicom_fusion.inference.serve.predict import Predictor

    try:
        one = Predictor.load(single if single is not None else default_card_path(), device=device)
        many = Predictor.load(ensemble, device=device)
        data = load_cohort(cohort, many.card, read_events=events_from_bundle, progress=True)
        result = compare_ensemble(one, many, data, cohort_name=str(cohort), spread_quantile=spread_quantile)
        page = write_comparison(result, out)
        if write_max_spread:
            spec = EnsembleSpec(members=many.card.ensemble.members,  # type: ignore[union-attr]
                                max_spread=result.spread.max_spread)
            write_card(dataclasses.replace(many.card, ensemble=spec), many.card.path)
    except (InferenceError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    s, e = result.single, result.ensemble
    console.print(f"single   ROC-AUC {s.roc_auc:.3f}  ECE {s.ece:.3f}  infer {s.infer_ms:.0f} ms/study")
    console.print(f"ensemble ROC-AUC {e.roc_auc:.3f}  ECE {e.ece:.3f}  infer {e.infer_ms:.0f} ms/study "
                  f"({e.networks} networks)")
    console.print(f"decision: the ensemble is {result.decision}")
    console.print(f"members disagree above spread {result.spread.max_spread:.4f}"
                  + (" (written to the card)" if write_max_spread else "") + f"; report: {page}")


TrainConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="Training TOML; keys are the fields of TrainConfig (folds, max_epochs, patience, "
    "seed, ...; see README 'Model').")]
CohortOpt = Annotated[Path, typer.Option(help="Cohort folder: cohort.csv, <patient>/study/*.dcm, "
                                         "<patient>/bundle.json (as `dicom-fusion synth` writes it).")]
FoldsOpt = Annotated[Optional[int], typer.Option(help="Cross-validation folds (default 5).")]
EpochsOpt = Annotated[Optional[int], typer.Option(help="Maximum epochs per fit; early stopping ends sooner.")]
TrainSeedOpt = Annotated[Optional[int], typer.Option(help="Seed of folds, weights, augmentation (default 0)")]
EncoderOpt = Annotated[Optional[str], typer.Option(help="smallcnn | densenet121 | efficientnet-b0.")]


def _train_config(config: Path | None, **overrides: object):  # type: ignore[no-untyped-def]
    from dicom_fusion.inference.train.classifier import load_train_config

    try:
        return load_train_config(config, **overrides)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _print_comparison(summary: dict) -> None:  # type: ignore[type-arg]
    from rich.table import Table

    from dicom_fusion.inference.report.evaluate import LABELS
    from dicom_fusion.inference.train.scores import format_mean_sd

    table = Table("model", "ROC-AUC", "F1", "ECE", title="cross-validation, mean ± sd over folds")
    for variant, metrics in summary.items():
        cells = (format_mean_sd(metrics[m]) for m in ("roc_auc", "f1", "ece"))
        table.add_row(LABELS.get(variant, variant), *cells)
    Console().print(table)


@app.command()
def train(cohort: CohortOpt,
          out: Annotated[Path, typer.Option(help="Folder for card.toml, weights.pt and training.json.")],
          config: TrainConfigOpt = None, folds: FoldsOpt = None, epochs: EpochsOpt = None,
          seed: TrainSeedOpt = None, encoder: EncoderOpt = None,
          report: Annotated[Optional[Path], typer.Option(
              help="Also cross-validate image-only, timeline-only and the baselines on the same folds and "
              "write the evaluation report here.")] = None) -> None:
    """Cross-validate the hybrid model, train it on every patient, write checkpoint + model card."""
    from dicom_fusion.fhir.events import events_from_bundle
    from dicom_fusion.inference.errors import InferenceError
    from dicom_fusion.inference.report.evaluate import evaluate_cv
    from dicom_fusion.inference.train.classifier import train_model
    from dicom_fusion.inference.train.fitloop import MODES

    settings = _train_config(config, folds=folds, max_epochs=epochs, seed=seed, encoder=encoder)
    try:
        # The serving EHR reader (fhir.events) reads the cohort's bundles: training sees what serving sees.
        result = train_model(cohort, out, settings, read_events=events_from_bundle,
                             modes=MODES if report else ("fusion",), progress=True)
        evaluation = evaluate_cv(result.cohort, result.cv, report, cohort_dir=cohort) if report else None
    except (InferenceError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    card, m = result.card, result.card.metrics
    if evaluation is not None:
        _print_comparison(evaluation.summary)
        console.print(f"evaluation report: {evaluation.report}")
    console.print(f"model {card.name} {card.version} written to {card.path} (sha256 {card.sha256[:12]}…) "
                  f"in {result.seconds:.0f} s; CV ROC-AUC {m['cv_roc_auc_mean']:.3f} ± "
                  f"{m['cv_roc_auc_sd']:.3f}")


@app.command()
def evaluate(cohort: CohortOpt,
             out: Annotated[Path, typer.Option(help="Folder for report.md/.html, metrics.json, PNGs.")],
             config: TrainConfigOpt = None, folds: FoldsOpt = None, epochs: EpochsOpt = None,
             seed: TrainSeedOpt = None, encoder: EncoderOpt = None) -> None:
    """k-fold report: fusion vs image-only CNN vs timeline-only LSTM vs sklearn baselines, explanations."""
    from dicom_fusion.fhir.events import events_from_bundle
    from dicom_fusion.inference.errors import InferenceError
    from dicom_fusion.inference.report.evaluate import evaluate_cohort

    settings = _train_config(config, folds=folds, max_epochs=epochs, seed=seed, encoder=encoder)
    try:
        evaluation = evaluate_cohort(cohort, out, settings, read_events=events_from_bundle, progress=True)
    except (InferenceError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    _print_comparison(evaluation.summary)
    console.print(f"evaluation report: {evaluation.report} ({evaluation.seconds:.0f} s)")


@app.command("config")
def show_config(config: ConfigOpt = None) -> None:
    """Print the effective configuration (secrets masked)."""
    settings = settings_or_exit(config)
    typer.echo(json.dumps(settings.public_dict(), indent=2, default=str))


@app.command()
def demo(patients: Annotated[int, typer.Option(min=1, max=50, help="Synthetic patients to send.")] = 4,
         out: Annotated[Path, typer.Option(help="Folder for the run and its results.")] = Path("demo-output"),
         seed: Annotated[int, typer.Option(help="Cohort seed.")] = 7,
         timeout: Annotated[float, typer.Option(help="Seconds to wait for all reports.")] = 240.0) -> None:
    """Run the whole loop on one machine: FHIR server, PACS, listener, worker, synthetic studies."""
    from dicom_fusion.service.demo.demo import run_demo

    raise typer.Exit(run_demo(patients=patients, out=out, seed=seed, timeout=timeout))


@app.command()
def redeliver(target: Annotated[str, typer.Argument(metavar="JOB_ID|STUDY_UID",
                                                    help="Job id (digits) or Study Instance UID.")],
              config: ConfigOpt = None) -> None:
    """Send a dead job back to the stage it died at, with a fresh retry budget.

    Its dead deliveries (SR, report, HL7) become pending again; delivered ones are not sent twice.
    With a Study Instance UID, the study's dead jobs are re-delivered (same as the API's dead-letter
    action: both call service/ops/operations.py).
    """
    from dicom_fusion.service.errors import ActionRefusedError, StudyNotFoundError
    from dicom_fusion.service.ops.operations import make_enqueue, redeliver_dead, redeliver_job
    from dicom_fusion.service.storage.ledger import Ledger

    settings = settings_or_exit(config)
    ledger = Ledger(settings.ledger_url)
    try:
        enqueue = make_enqueue(ledger, settings)
        if target.isdigit():
            results = [redeliver_job(ledger, enqueue, int(target))]
        else:
            results = redeliver_dead(ledger, enqueue, study_uid=target)
    except (StudyNotFoundError, ActionRefusedError) as exc:
        console.print(f"[red]error:[/red] {exc} (ledger {redact_url(settings.ledger_url)}; same --config as the "
                      "service?)")
        raise typer.Exit(1) from exc
    finally:
        ledger.close()
    for r in results:
        typer.echo(f"{r.message} with a fresh retry budget")


# Operator commands: api, status, retry, replay, send (service/ops/opscli.py).
from dicom_fusion.service.ops.opscli import register as _register_operator_commands  # noqa: E402

_register_operator_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
