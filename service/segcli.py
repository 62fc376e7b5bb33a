"""`dicom-fusion segment train|evaluate`: the lesion segmenter's training and k-fold report (typer sub-app)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

segment_app = typer.Typer(no_args_is_help=True, help="Lesion segmentation: train, evaluate (k-fold report).")
console = Console(stderr=True, soft_wrap=True)  # error messages never wrap: paths stay whole, whatever the width

CohortOpt = Annotated[Path, typer.Option(help="Cohort folder (cohort.csv with a mask column, as `synth` writes).")]
FoldsOpt = Annotated[int, typer.Option(min=2, help="Cross-validation folds (by patient).")]
SeedOpt = Annotated[int, typer.Option(help="Seed of folds, initialisation, batches and augmentation.")]
EpochsOpt = Annotated[int, typer.Option(min=1, help="Maximum epochs per fit (early stopping on a validation split).")]
ThreeDOpt = Annotated[bool, typer.Option("--3d", help="Volumes (CT cohort): 3D networks on [32, 96, 96].")]


def _setup(cohort: Path, three_d: bool):  # type: ignore[no-untyped-def]
    from dicom_fusion.inference.data.cohort import CohortError
    from dicom_fusion.inference.train.segmenter import DEFAULT_SPEC_2D, DEFAULT_SPEC_3D, load_seg_cohort

    spec = DEFAULT_SPEC_3D if three_d else DEFAULT_SPEC_2D
    try:
        return spec, load_seg_cohort(cohort, spec)
    except CohortError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _archs(text: str) -> list[str]:
    from dicom_fusion.inference.card.segmenter import ARCHS

    archs = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if bad or not archs:
        console.print(f"[red]error:[/red] unknown architecture(s) {bad or text!r}; use {', '.join(ARCHS)}")
        raise typer.Exit(2)
    return archs


def _run_cv(cohort_data, archs, folds, seed, epochs):  # type: ignore[no-untyped-def]
    from dicom_fusion.inference.train.segmenter import SegFitSettings, cross_validate_segmenter

    settings = SegFitSettings(max_epochs=epochs)
    results = []
    for arch in archs:
        r = cross_validate_segmenter(cohort_data, arch=arch, folds=folds, seed=seed, settings=settings)
        console.print(f"{arch}: Dice {r.summary('dice')[0]:.3f} ± {r.summary('dice')[1]:.3f}, Jaccard "
                      f"{r.summary('jaccard')[0]:.3f} ± {r.summary('jaccard')[1]:.3f}, HD95 "
                      f"{r.summary('hd95_mm')[0]:.2f} ± {r.summary('hd95_mm')[1]:.2f} mm ({r.seconds:.0f} s)")
        results.append(r)
    return settings, results


@segment_app.command("evaluate")
def evaluate(cohort: CohortOpt, report: Annotated[Path, typer.Option(help="Report folder.")],
             folds: FoldsOpt = 5, seed: SeedOpt = 0, epochs: EpochsOpt = 20,
             archs: Annotated[str, typer.Option(help="Comma-separated architectures.")] = "unet,segresnet",
             three_d: ThreeDOpt = False) -> None:
    """k-fold cross-validation of each architecture: Dice, Jaccard, HD95, overlays, report.md/html + metrics.json.

    Architectures already saved in the report folder (cv-<arch>.json) stay in the comparison table."""
    from dicom_fusion.inference.report.segmentation import save_arch_result, write_seg_report

    chosen = _archs(archs)
    _, data = _setup(cohort, three_d)
    _, results = _run_cv(data, chosen, folds, seed, epochs)
    for r in results:
        save_arch_result(r, data, report, cohort_name=cohort.name)
    console.print(f"report: {write_seg_report(report)}")


@segment_app.command("train")
def train(cohort: CohortOpt, out: Annotated[Path, typer.Option(help="Folder for card.toml + weights.pt.")],
          folds: FoldsOpt = 5, seed: SeedOpt = 0, epochs: EpochsOpt = 20,
          arch: Annotated[str, typer.Option(help="unet or segresnet.")] = "unet",
          report: Annotated[Optional[Path], typer.Option(help="Also save this architecture's k-fold results "
                                                          "in this report folder and rebuild the report.")] = None,
          name: Annotated[str, typer.Option(help="Model name in the card, the SEG and the SR.")] = "dfusion-lesion-seg",
          version: Annotated[str, typer.Option(help="Model version.")] = "0.1.0",
          three_d: ThreeDOpt = False) -> None:
    """Cross-validate, train the final segmenter on every patient, write weights.pt + card.toml (CV metrics)."""
    import torch

    from dicom_fusion.inference.card.model import sha256_file
    from dicom_fusion.inference.card.segmenter import SegInput, SegmenterCard, write_segmenter_card
    from dicom_fusion.inference.nets.segnet import DEFAULT_FEATURES
    from dicom_fusion.inference.report.segmentation import save_arch_result, write_seg_report
    from dicom_fusion.inference.train.segmenter import train_final

    _archs(arch)
    spec, data = _setup(cohort, three_d)
    settings, results = _run_cv(data, [arch], folds, seed, epochs)
    if report is not None:
        save_arch_result(results[0], data, report, cohort_name=cohort.name)
        console.print(f"report: {write_seg_report(report)}")
    cv = results[0]
    final_epochs = max(1, round(statistics.median(cv.best_epochs)))
    net = train_final(data, arch=arch, epochs=final_epochs, seed=seed, settings=settings)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "weights.pt"
    torch.save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, weights)
    metrics: dict[str, float] = {}
    for m in ("dice", "jaccard", "hd95_mm"):
        mean, sd = cv.summary(m)
        metrics[f"cv_{m}_mean"], metrics[f"cv_{m}_sd"] = round(mean, 4), round(sd, 4)
    metrics.update(cv_folds=float(folds), n_patients=float(len(data)), final_epochs=float(final_epochs),
                   seed=float(seed))
    card = SegmenterCard(
        name=name, version=version, weights=weights, sha256=sha256_file(weights), arch=arch,
        features=DEFAULT_FEATURES, threshold=0.5,
        image=SegInput(spatial_dims=spec.spatial_dims, size=spec.size, channels=spec.channels, window=spec.window),
        metrics=metrics, path=out / "card.toml",
    )
    write_segmenter_card(card, out / "card.toml")
    console.print(f"segmenter: {out / 'card.toml'} ({final_epochs} epochs, {weights.stat().st_size} bytes)")


__all__ = ["segment_app"]
