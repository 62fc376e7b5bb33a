"""Read model of the models this deployment serves (README "Read the dashboard": Models): the model cards
its routes name, each with the routes that use it, the facts an operator checks first (name, version,
intended use, threshold, calibration) and the card as a readable document (`dicom-fusion model card`).

The routes are the ones `serve` and `dicom-fusion routes check` load (`routing/routes.py`): the configured
route table, else the implicit ones (`default` = `model.card`, `chest-ct` = `model.ct_card`). Unlike the
route loader, which refuses the whole table for one bad card, each card is read on its own here: a card that
cannot be read, or whose weights are not the ones it names, is listed with its error and the others still
show. A route table that cannot be read at all (a missing route file, bad TOML) is the overview's `error`.

Only what the cards say leaves this module: names, versions, paths, figures and text. No patient data.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from dicom_fusion.inference.card.document import card_document
from dicom_fusion.inference.card.model import ModelCard, load_card, verify_weights
from dicom_fusion.inference.errors import ModelCardError
from dicom_fusion.service.config import Settings
from dicom_fusion.service.routing.routes import RouteError, route_card_path, route_where, routes_in_force

log = logging.getLogger(__name__)

UNCALIBRATED = "none (identity)"  # what Calibrator.describe() says of the identity


@dataclass(frozen=True)
class ServedModel:
    """One model card and the routes that send studies to it. Without `error`, every card field is set;
    with it, they are set only when the card itself was read (the weights were refused)."""

    card_path: str
    routes: tuple[str, ...]
    model: str | None
    version: str | None
    modalities: tuple[str, ...]
    intended_use: str | None
    threshold: float | None
    calibration: str | None
    """The calibrator of the full model (`describe()`, e.g. "Platt scaling (slope …)"); "none (identity)"."""
    indeterminate: tuple[float, float] | None
    document: str | None
    """The card as a readable document (`inference/card/document.py`, plain text with Markdown headings)."""
    error: str | None
    """Why the card cannot serve: unreadable, invalid, or its weights missing or changed."""


@dataclass(frozen=True)
class ServedModels:
    """The route table's source and its models in route order (a card named by several routes once)."""

    source: str
    models: tuple[ServedModel, ...]
    error: str | None
    """The route table itself cannot be read: no model is listed."""


@lru_cache(maxsize=32)
def _card(path: str, mtime_ns: int) -> ModelCard:  # mtime in the key: a rewritten card is read again
    return load_card(Path(path))


@lru_cache(maxsize=32)
def _weights_error(card_path: str, card_mtime_ns: int, weights_stamp: tuple[int, int]) -> str | None:
    """`verify_weights` once per card and weights file version (it hashes the whole file)."""
    try:
        verify_weights(_card(card_path, card_mtime_ns))
    except (ModelCardError, OSError) as exc:
        return f"weights: {exc}"
    return None


def _weights_checked(card: ModelCard, card_path: str, card_mtime_ns: int) -> str | None:
    try:
        st = card.weights.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (0, -1)  # missing: verify_weights says so
    return _weights_error(card_path, card_mtime_ns, stamp)


def _unreadable(card_path: str, routes: tuple[str, ...], error: str) -> ServedModel:
    return ServedModel(card_path=card_path, routes=routes, model=None, version=None, modalities=(),
                       intended_use=None, threshold=None, calibration=None, indeterminate=None, document=None,
                       error=error)


def served_model(path: Path, routes: tuple[str, ...]) -> ServedModel:
    """The card at `path` as the dashboard lists it; an unreadable card gives an entry with its error."""
    try:
        resolved, mtime_ns = str(path.resolve()), path.stat().st_mtime_ns
        card = _card(resolved, mtime_ns)
    except (OSError, ModelCardError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        log.debug("models: card %s not readable (%s)", path, reason)
        return _unreadable(str(path), routes, f"cannot load the model card {path}: {reason}")
    cal = card.calibration
    return ServedModel(card_path=str(path), routes=routes, model=card.name, version=card.version,
                       modalities=tuple(card.input.modalities), intended_use=card.intended_use,
                       threshold=card.threshold, calibration=cal.describe() if cal is not None else UNCALIBRATED,
                       indeterminate=cal.indeterminate if cal is not None else None,
                       document=card_document(card), error=_weights_checked(card, resolved, mtime_ns))


def served_models(settings: Settings) -> ServedModels:
    """Every model card the route table of `settings` names, in the order of the first route naming it, with
    the names of its routes; a route whose `model` is unusable is an entry of its own."""
    try:
        entries, source, base = routes_in_force(settings)
    except RouteError as exc:
        return ServedModels(source=str(settings.routing.file or ""), models=(), error=str(exc))
    cards: dict[str, tuple[Path, list[str]]] = {}  # resolved card path -> (path as named, route names)
    slots: list[str | ServedModel] = []  # route order: a card's key at its first route, or a broken route
    for index, raw in enumerate(entries):
        try:
            where = route_where(raw, index, source)
            path = route_card_path(raw, where, settings, base)
        except RouteError as exc:  # no name, or no usable `model`: nothing to read
            name = raw.get("name") if isinstance(raw, dict) else None
            label = name.strip() if isinstance(name, str) and name.strip() else f"#{index + 1}"
            slots.append(_unreadable("", (label,), str(exc)))
            continue
        key = str(path.resolve())
        if key not in cards:
            cards[key] = (path, [])
            slots.append(key)
        cards[key][1].append(str(raw["name"]).strip())
    models = tuple(slot if isinstance(slot, ServedModel) else served_model(cards[slot][0], tuple(cards[slot][1]))
                   for slot in slots)
    return ServedModels(source=source, models=models, error=None)


__all__ = ["ServedModel", "ServedModels", "served_model", "served_models"]
