"""Writing a trained network: weights first (temp file, fsync, rename), then the card naming their sha256."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import torch

from dicom_fusion.inference.card.model import ModelCard, sha256_file, write_card


def save_state(state: dict[str, torch.Tensor], card: ModelCard, metrics: dict[str, float]) -> ModelCard:
    """Write `state` to `card.weights`, then the card with their sha256 and `metrics`: never a card that
    points at missing or other weights. Used for the final model and for each ensemble member."""
    out_dir = card.weights.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".weights-", suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, card.weights)
    final = dataclasses.replace(card, sha256=sha256_file(card.weights), metrics=metrics)
    write_card(final, card.path)
    return final


__all__ = ["save_state"]
