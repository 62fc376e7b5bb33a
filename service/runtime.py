"""Per-process runtime of a worker: settings, ledger, spool, Celery app, and lazily the model.

Built once by ``dicom-fusion worker`` (:func:`install`) and shared by the stage tasks; the model and the
FHIR client are created on first use so a worker that only serves the ``io`` queue never loads torch.
"""
from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING, Any

from celery import Celery

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ledger import Ledger, Stage
from dicom_fusion.service.spool import Spool

if TYPE_CHECKING:
    from dicom_fusion.fhir.client import FhirClient
    from dicom_fusion.inference.modelcard import ModelCard
    from dicom_fusion.inference.predict import Predictor
    from dicom_fusion.inference.segment import Segmenter


class WorkerRuntime:
    def __init__(self, settings: Settings, app: Celery) -> None:
        self.settings = settings
        self.app = app
        self.ledger = Ledger(settings.ledger_url)
        self.spool = Spool(settings.spool_dir, fsync=settings.spool.fsync)
        self._lock = threading.Lock()

    @cached_property
    def card(self) -> ModelCard:
        from dicom_fusion.inference.modelcard import load_card

        return load_card(self.settings.model_card_path())

    @cached_property
    def predictor(self) -> Predictor:
        from dicom_fusion.inference.predict import Predictor

        with self._lock:
            return Predictor.load(self.settings.model_card_path(), device=self.settings.model.device)

    @cached_property
    def segmenter(self) -> Segmenter | None:
        """The lesion segmenter: `model.segmenter`, else the card's `segmenter` key; None = disabled."""
        path = self.settings.model.segmenter or self.card.segmenter
        if path is None:
            return None
        from dicom_fusion.inference.segment import Segmenter

        with self._lock:
            return Segmenter.load(path, device=self.settings.model.device)

    def fhir_client(self) -> FhirClient:
        from dicom_fusion.service.wiring import make_fhir_client

        return make_fhir_client(self.settings.fhir)

    def on_dead(self, job_id: int, stage: Stage, reason: str) -> None:
        """A dead job at delivery leaves the undelivered side visibly dead, never silently pending."""
        if stage == Stage.DELIVER:
            self.ledger.bury_deliveries(job_id, reason=reason)


_runtime: WorkerRuntime | None = None


def install(settings: Settings, app: Celery) -> WorkerRuntime:
    global _runtime
    _runtime = WorkerRuntime(settings, app)
    return _runtime


def get() -> Any:
    if _runtime is None:
        raise RuntimeError("worker runtime not installed; start workers with `dicom-fusion worker`")
    return _runtime


def reset_after_fork() -> None:
    if _runtime is not None:
        _runtime.ledger.engine.dispose(close=False)
