"""Read model of model drift (README "Drift"): per model card that carries a drift reference, the PSI of
each item over the model's last `window` jobs, for the dashboard and `dicom_fusion_model_drift_psi`.

The cards are the service's default card (`model.card`) and every card the jobs behind the latest
`RECENT_JOBS` observations ran with (`Job.card_path`: routes may name others). Observations are matched to
a card by model name and version, the newest `window` of them (the card's `drift.window`) against the
reference. PSI is biased upwards on small samples (inference/card/drift.py), so a model whose window is not
yet full is shown as collecting and exports no PSI: an alert on a handful of studies would be noise.

Only values leave this module: model names, item names and numbers, never a patient or a UID.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from sqlalchemy import select

from dicom_fusion.inference.card.drift import DriftStatus, psi, status
from dicom_fusion.inference.card.model import ModelCard, load_card
from dicom_fusion.inference.errors import ModelCardError
from dicom_fusion.service.config import Settings
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import DriftObservation, Job

log = logging.getLogger(__name__)

RECENT_JOBS = 2000
"""The cards of the jobs behind the latest this many observations are monitored (besides `model.card`)."""


@dataclass(frozen=True)
class ItemDrift:
    """One item of a model: its PSI over the window's values (NaN when none of them has the item)."""

    item: str
    psi: float
    status: DriftStatus | None
    values: int
    """How many of the window's jobs had the item (a `value.*` item only when the feature was observed)."""


@dataclass(frozen=True)
class ModelDrift:
    """One model card with a drift reference and its window of recent observations."""

    model: str
    version: str
    window: int
    observations: int
    """Observations in the window (at most `window`)."""
    reference: str
    items: tuple[ItemDrift, ...]

    @property
    def full(self) -> bool:
        """The window holds `window` observations: PSI is meaningful (see the module docstring)."""
        return self.observations >= self.window


@lru_cache(maxsize=32)
def _card(path: str, mtime_ns: int) -> ModelCard:  # mtime in the key: a rewritten card is read again
    return load_card(Path(path))


def _cards(ledger: Ledger, settings: Settings) -> list[ModelCard]:
    recent = select(DriftObservation.job_id).order_by(DriftObservation.id.desc()).limit(RECENT_JOBS).subquery()
    with ledger.session() as s:  # the cards of recent jobs only: a scrape must not read the whole table
        paths = set(s.scalars(select(Job.card_path).distinct().join(recent, recent.c.job_id == Job.id)))
    cards: dict[tuple[str, str], ModelCard] = {}
    for raw in [str(settings.model_card_path()), *sorted(p for p in paths if p)]:
        path = Path(raw)
        try:
            card = _card(str(path.resolve()), path.stat().st_mtime_ns)
        except (OSError, ModelCardError) as exc:
            log.debug("drift: card %s not readable (%s); left out", path, exc)
            continue
        if card.drift is not None:
            cards.setdefault((card.name, card.version), card)
    return list(cards.values())


def _window(ledger: Ledger, card: ModelCard, size: int) -> list[dict[str, float]]:
    with ledger.session() as s:
        rows = s.scalars(select(DriftObservation.items)
                         .where(DriftObservation.model_name == card.name,
                                DriftObservation.model_version == card.version)
                         .order_by(DriftObservation.created_at.desc(), DriftObservation.id.desc())
                         .limit(size)).all()
    return [json.loads(r) for r in rows]


def _items(card: ModelCard, window: Iterable[dict[str, float]]) -> tuple[ItemDrift, ...]:
    assert card.drift is not None
    rows = list(window)
    out = []
    for name, reference in sorted(card.drift.items.items()):
        values = [float(r[name]) for r in rows if name in r]
        value = psi(reference, values)
        out.append(ItemDrift(item=name, psi=value, status=None if math.isnan(value) else status(value),
                             values=len(values)))
    return tuple(out)


def model_drift(ledger: Ledger, settings: Settings) -> list[ModelDrift]:
    """Every known model card with a drift reference, its window and the PSI per item."""
    out = []
    for card in _cards(ledger, settings):
        assert card.drift is not None
        window = _window(ledger, card, card.drift.window)
        out.append(ModelDrift(model=card.name, version=card.version, window=card.drift.window,
                              observations=len(window), reference=card.drift.source or "",
                              items=_items(card, window)))
    return out


__all__ = ["ItemDrift", "ModelDrift", "model_drift"]
