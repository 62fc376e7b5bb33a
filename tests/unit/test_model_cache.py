"""The worker's model cache (jobs/worker.py WorkerRuntime.models): each model stays loaded after its first
use, at most `worker.max_loaded_models` per worker process, the least recently used released (and its GPU
memory returned). Cards are the shipped model and copies of its card under other names (other models to
the service, the same weights)."""
from __future__ import annotations

import dataclasses
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest

from dicom_fusion.inference.card.model import load_card, verify_weights, write_card
from dicom_fusion.inference.serve.predict import Predictor
from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.jobs.worker import WorkerRuntime


def _card_copy(settings: Settings, folder: Path, name: str) -> Path:
    card = load_card(settings.model_card_path())
    folder.mkdir(parents=True, exist_ok=True)
    write_card(dataclasses.replace(card, name=name, path=folder / "card.toml"), folder / "card.toml")
    verify_weights(load_card(folder / "card.toml"))  # the copy names the shipped weights, unchanged
    return folder / "card.toml"


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The card of every Predictor.load (the real one runs)."""
    calls: list[Path] = []
    real = Predictor.load.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, card_path: Path, *args: Any, **kwargs: Any) -> Predictor:
        calls.append(Path(card_path))
        return real(cls, card_path, *args, **kwargs)

    monkeypatch.setattr(Predictor, "load", classmethod(counting))
    return calls


def _runtime(tmp_path: Path, max_loaded: int, device: str = "cpu") -> tuple[WorkerRuntime, list[str]]:
    settings = load_settings(data_dir=tmp_path / "var", worker={"max_loaded_models": max_loaded},
                             model={"device": device})
    cards = [str(settings.model_card_path()),
             str(_card_copy(settings, tmp_path / "second", "dfusion-second")),
             str(_card_copy(settings, tmp_path / "third", "dfusion-third"))]
    return WorkerRuntime(settings, app=None), cards  # type: ignore[arg-type]


def test_each_model_is_loaded_once_and_kept(tmp_path: Path, loads: list[Path]) -> None:
    rt, (first, second, _) = _runtime(tmp_path, max_loaded=4)
    p1 = rt.models(first).predictor
    p2 = rt.models(second).predictor
    assert p1 is not p2 and p1.card.name != p2.card.name
    for _ in range(3):  # later studies on either model: no load
        assert rt.models(first).predictor is p1 and rt.models(second).predictor is p2
    assert loads == [Path(first), Path(second)]
    assert rt.models("").predictor is p1  # "" = the default model, the same entry
    assert rt.loaded_models() == [Path(second), Path(first)]  # least recently used first


def test_the_least_recently_used_model_is_released_beyond_the_bound(tmp_path: Path, loads: list[Path]) -> None:
    rt, (first, second, third) = _runtime(tmp_path, max_loaded=2)
    p1 = weakref.ref(rt.models(first).predictor)
    p2 = weakref.ref(rt.models(second).predictor)
    rt.models(first)  # first used again: second is now the least recently used
    p3 = weakref.ref(rt.models(third).predictor)
    assert rt.loaded_models() == [Path(first), Path(third)]
    gc.collect()
    assert p2() is None, "the released model is still in memory"
    assert p1() is not None and rt.models(first).predictor is p1()  # kept: no load; third is now the oldest
    rt.models(second).predictor  # back: loaded again, and third goes
    assert loads == [Path(first), Path(second), Path(third), Path(second)]
    assert rt.loaded_models() == [Path(first), Path(second)]
    gc.collect()
    assert p3() is None and p1() is not None


def test_a_running_stage_keeps_its_model_while_the_cache_drops_it(tmp_path: Path, loads: list[Path]) -> None:
    rt, (first, second, _) = _runtime(tmp_path, max_loaded=1)
    models = rt.models(first)  # what a stage holds while it runs
    predictor = models.predictor
    rt.models(second)  # another job's stage: first leaves the cache
    assert rt.loaded_models() == [Path(second)]
    assert models.predictor is predictor and models.loaded  # the running stage is not disturbed
    assert loads == [Path(first)]


def test_on_cuda_the_freed_blocks_go_back_to_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    emptied: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    rt, (first, second, third) = _runtime(tmp_path, max_loaded=1, device="cuda")
    rt.models(first).card
    rt.models(second).card  # first dropped, but it held no weights: nothing to give back
    assert emptied == []
    held = rt.models(second)
    held.__dict__["predictor"] = object()  # as if loaded on the GPU (no GPU on this host)
    del held
    rt.models(third)
    assert emptied == [1]
