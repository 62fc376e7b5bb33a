"""A labelled cohort on disk -> arrays for training: images (cached), EHR events, labels.

Layout (what `synth.generate_cohort` writes, and what a site exports for retraining):
`DIR/cohort.csv` with columns patient_id, label (1 = the card's positive class), study_time (ISO 8601
with offset); `DIR/<patient_id>/study/*.dcm`; `DIR/<patient_id>/bundle.json` (a FHIR R4 Bundle, any
type, whose entries hold the patient's resources). A missing bundle means "no EHR": the patient is
trained and evaluated on the image-only path, as the service would serve it.

Images go through `transforms.load_study_image` - the serving code path - so training sees exactly
the arrays a worker would feed the network. Decoding is the slow part of an epoch-free pipeline, so
the decoded cohort is cached as one `.npy` per (cohort, image spec) under `DIR/.cache/`.

Bundles are read by the function the caller passes as `read_events` (a `BundleEventReader`), never by
code of this package: the service passes `dicom_fusion.fhir.events.events_from_bundle`, the same reader
the timeline stage uses on the FHIR server's answers, so training and serving read the EHR one way
(preferred codings, UCUM units converted to the card's, refuted conditions and contained medications
handled alike). `inference/` must not import `dicom_fusion.fhir`, hence the parameter.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.progress import track

from dicom_fusion.inference.card.model import ModelCard, TimelineSpec
from dicom_fusion.inference.data.timeline_tensor import EventLike
from dicom_fusion.inference.errors import InferenceError

CACHE_DIR = ".cache"
CACHE_FORMAT = 1


class CohortError(InferenceError, ValueError):
    """A cohort folder is missing files or holds values the trainer cannot use."""


class BundleEventReader(Protocol):
    """Reads one patient's FHIR Bundle (parsed JSON) into timeline events, the way serving reads the server.

    `resource_types` are the card's (`TimelineSpec.resource_types`); `target_units` maps `system|code` to
    the unit the card expects, values are converted to it or left out; `value_bounds` maps `system|code` to
    the card's plausible (min, max), values outside are left out (as the timeline stage does). Raises
    ValueError for a JSON
    document that is not a Bundle. `dicom_fusion.fhir.events.events_from_bundle` is the implementation.
    """

    def __call__(
        self,
        bundle: Mapping[str, Any],
        /,
        *,
        resource_types: Sequence[str],
        target_units: Mapping[str, str],
        value_bounds: Mapping[str, tuple[float | None, float | None]],
    ) -> Sequence[EventLike]: ...


@dataclass(frozen=True)
class EhrEvent:
    """A timeline event built in code (tests, notebooks); satisfies `timeline_tensor.EventLike`.

    Bundles are never read into this type: the injected `BundleEventReader` makes the events.
    """

    kind: str
    system: str
    code: str
    time: datetime
    value: float | None
    unit: str | None = None


@dataclass(frozen=True)
class CohortRecord:
    """One row of cohort.csv with the paths of its study and bundle."""

    patient_id: str
    label: int
    study_time: datetime
    study_dir: Path
    bundle_path: Path


@dataclass(frozen=True, eq=False)
class Cohort:
    """Everything training needs, indexed by patient position (same order as cohort.csv)."""

    records: tuple[CohortRecord, ...]
    labels: np.ndarray  # [N] int64, 1 = positive class
    images: np.ndarray  # [N, C, *size] float32, prepared with the card's ImageSpec
    events: tuple[tuple[EventLike, ...], ...]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def study_times(self) -> tuple[datetime, ...]:
        return tuple(r.study_time for r in self.records)


def _parse_time(value: Any) -> datetime | None:
    """cohort.csv study_time (ISO 8601) -> tz-aware UTC; partial dates mean their first instant, a time
    without offset is taken as UTC."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if len(text) == 4 and text.isdigit():
        text += "-01-01"
    elif len(text) == 7 and text[4] == "-":
        text += "-01"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


# --------------------------------------------------------------------------- FHIR bundles


def read_bundle_events(
    path: Path, spec: TimelineSpec, *, read_events: BundleEventReader
) -> tuple[EventLike, ...]:
    """Events of the FHIR Bundle file at `path`, read with `read_events` for `spec`; () when the file does
    not exist (a patient without EHR)."""
    path = Path(path)
    if not path.is_file():
        return ()
    try:
        bundle = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CohortError(
            f"{path}: not a readable JSON FHIR Bundle ({exc}); regenerate or remove it"
        ) from exc
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        got = bundle.get("resourceType") if isinstance(bundle, dict) else type(bundle).__name__
        raise CohortError(f"{path}: expected a FHIR Bundle, got {got!r}; export the patient's resources "
                          "as one Bundle or remove the file")
    try:
        events = read_events(
            bundle, resource_types=spec.resource_types, target_units=spec.target_units,
            value_bounds=spec.value_bounds,
        )
    except ValueError as exc:
        raise CohortError(f"{path}: {exc}") from exc
    return tuple(events)


# --------------------------------------------------------------------------- cohort.csv


def read_cohort_csv(cohort_dir: Path) -> tuple[CohortRecord, ...]:
    """Rows of `cohort_dir/cohort.csv`, validated (labels 0/1, tz-aware study times, study folders)."""
    cohort_dir = Path(cohort_dir)
    csv_path = cohort_dir / "cohort.csv"
    if not csv_path.is_file():
        raise CohortError(
            f"{csv_path} does not exist; point --cohort at a folder written by `dicom-fusion synth` "
            "or one with cohort.csv (patient_id,label,study_time) and <patient_id>/study/*.dcm"
        )
    records = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                pid, label, when = row["patient_id"], int(row["label"]), _parse_time(row["study_time"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CohortError(f"{csv_path}:{line}: needs patient_id, integer label, study_time") from exc
            if label not in (0, 1) or when is None:
                raise CohortError(f"{csv_path}:{line}: label must be 0 or 1 and study_time ISO 8601")
            study_dir = cohort_dir / pid / "study"
            if not study_dir.is_dir():
                raise CohortError(f"{csv_path}:{line}: study folder {study_dir} does not exist")
            records.append(CohortRecord(pid, label, when, study_dir, cohort_dir / pid / "bundle.json"))
    if len({r.patient_id for r in records}) != len(records):
        raise CohortError(f"{csv_path}: patient_id values must be unique (folds are split by patient)")
    if len({r.label for r in records}) < 2:
        raise CohortError(f"{csv_path}: needs patients of both labels to train a classifier")
    return tuple(records)


# --------------------------------------------------------------------------- images


def _cache_key(records: Sequence[CohortRecord], card: ModelCard) -> str:
    """Changes when the image spec, input selection or any study file (name, size, mtime) changes."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{card.image!r}|{card.input!r}".encode())
    for r in records:
        for f in sorted(r.study_dir.glob("*.dcm")):
            st = f.stat()
            digest.update(f"{r.patient_id}/{f.name}:{st.st_size}:{st.st_mtime_ns}|".encode())
    return digest.hexdigest()[:16]


def load_images(
    records: Sequence[CohortRecord],
    card: ModelCard,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Prepared images [N, C, *size] via the serving transform; read from / written to `cache_dir`."""
    from dicom_fusion.inference.data.images import (
        load_study_image,  # MONAI import is deferred until images are needed
    )

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"images-{_cache_key(records, card)}.npy"
        if cache.is_file():
            return np.load(cache)
    arrays = [
        load_study_image(sorted(r.study_dir.glob("*.dcm")), card).array
        for r in track(
            records,
            description="Decoding studies",
            disable=not progress,
            console=Console(stderr=True),
            transient=True,
        )
    ]
    images = np.stack(arrays).astype(np.float32)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, images)
            tmp.replace(cache)
        except OSError:  # read-only cohort: keep going without a cache
            pass
    return images


def load_cohort(
    cohort_dir: Path,
    card: ModelCard,
    *,
    read_events: BundleEventReader,
    cache: bool = True,
    progress: bool = True,
) -> Cohort:
    """Read cohort.csv, every study (cached) and every bundle of `cohort_dir`.

    `read_events` reads each bundle (pass `dicom_fusion.fhir.events.events_from_bundle`, the serving
    reader; see the module docstring for why it is a parameter).
    """
    cohort_dir = Path(cohort_dir)
    records = read_cohort_csv(cohort_dir)
    images = load_images(
        records, card, cache_dir=cohort_dir / CACHE_DIR if cache else None, progress=progress
    )
    return Cohort(
        records=records,
        labels=np.array([r.label for r in records], dtype=np.int64),
        images=images,
        events=tuple(
            read_bundle_events(r.bundle_path, card.timeline, read_events=read_events) for r in records
        ),
    )


__all__ = [
    "BundleEventReader",
    "Cohort",
    "CohortError",
    "CohortRecord",
    "EhrEvent",
    "load_cohort",
    "load_images",
    "read_bundle_events",
    "read_cohort_csv",
]
