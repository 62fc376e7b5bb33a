"""The CT model's training keys (TrainConfig modalities / spatial_dims / size / window / series_rule) reach
the card and are validated before any image is decoded; the shipped CT model is the one its train.toml
describes; a volume's Grad-CAM overlay shows the slice of
the saliency peak, not the middle slice that may miss the finding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicom_fusion.inference.card.model import DEFAULT_IMAGE, DEFAULT_INPUT, load_card, verify_weights
from dicom_fusion.inference.serve.explain import save_overlay
from dicom_fusion.inference.train.config import base_card, load_train_config
from dicom_fusion.service.outputs.sc.build import peak_slice, render_overlay

CT_TRAIN = Path(__file__).resolve().parents[2] / "inference" / "ct_model" / "train.toml"


def test_ct_train_toml_makes_a_3d_ct_only_card(tmp_path: Path) -> None:
    config = load_train_config(CT_TRAIN)
    card = base_card(config, tmp_path)
    assert card.input.modalities == ("CT",)
    assert card.image.spatial_dims == 3 and len(card.image.size) == 3
    assert card.image.window == config.window and card.image.window[0] < card.image.window[1]
    assert card.name == config.name != "dfusion-hybrid-demo"


def test_the_shipped_ct_model_is_what_its_train_toml_trains() -> None:
    card = load_card(CT_TRAIN.parent / "card.toml")
    verify_weights(card)
    config = load_train_config(CT_TRAIN)
    assert (card.name, card.version, card.input.modalities) == (config.name, config.version, ("CT",))
    assert (card.image.spatial_dims, card.image.size, card.image.window) == (3, config.size, config.window)
    assert card.metrics["cv_folds"] == config.folds and card.calibration is not None
    assert card.weights.stat().st_size < 2 * 1024 * 1024  # package data: keep it small


def test_default_config_keeps_the_radiograph_card(tmp_path: Path) -> None:
    card = base_card(load_train_config(None), tmp_path)
    assert card.input == DEFAULT_INPUT and card.image.size == DEFAULT_IMAGE.size
    assert card.image.spatial_dims == 2 and card.image.window is None


@pytest.mark.parametrize(("values", "message"), [
    ({"spatial_dims": 3}, "needs size"),
    ({"size": [16, 48, 48]}, "spatial_dims is 2"),
    ({"spatial_dims": 3, "size": [16, 48]}, "spatial_dims is 3"),
    ({"window": [400.0, -1000.0]}, "low must be below high"),
    ({"modalities": []}, "modalities is empty"),
    ({"series_rule": "biggest"}, "series_rule"),
])
def test_bad_image_keys_are_refused_with_the_key_named(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_train_config(None, **values)


def test_toml_lists_become_tuples(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text('modalities = ["ct"]\nspatial_dims = 3\nsize = [8, 16, 16]\nwindow = [-100, 100]\n')
    config = load_train_config(path)
    assert config.size == (8, 16, 16) and config.window == (-100, 100)
    assert base_card(config, tmp_path).input.modalities == ("CT",)


def _volume_with_peak(k: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((1, 8, 16, 16), np.float32)
    image[0, k] = 1.0  # only the salient slice is bright
    saliency = np.zeros((8, 16, 16), np.float32)
    saliency[k, 4:8, 4:8] = 1.0
    return image, saliency


def test_volume_overlay_shows_the_slice_of_the_saliency_peak(tmp_path: Path) -> None:
    image, saliency = _volume_with_peak(6)  # not the middle slice (4)
    assert peak_slice(saliency) == 6 and peak_slice(saliency[0]) is None
    rgb = render_overlay(image, saliency)
    assert rgb.shape[2] == 3 and rgb[-1, -1].min() == 255  # a non-salient pixel of the bright slice
    with pytest.raises(ValueError, match="does not match"):
        render_overlay(image, saliency[:4])
    png = save_overlay(image, saliency, tmp_path / "overlay.png", title="t")
    assert png.is_file() and png.stat().st_size > 0
