"""Model card: TOML round trip, validation messages, weights integrity, the shipped default model."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from dicom_fusion.inference.card.model import (
    ClassSpec,
    ImageSpec,
    InputSelection,
    TimelineFeature,
    card_to_toml,
    default_card,
    default_card_path,
    load_card,
    sha256_file,
    verify_weights,
    write_card,
)
from dicom_fusion.inference.errors import InferenceError, ModelCardError, WeightsMismatchError


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"not really a checkpoint, only bytes to hash")
    return path


@pytest.fixture
def card_path(tmp_path: Path, weights: Path) -> Path:
    card = default_card(
        weights=weights,
        sha256=sha256_file(weights),
        path=tmp_path / "card.toml",
        metrics={"roc_auc": 0.87, "f1": 0.7},
    )
    write_card(card, card.path)
    return card.path


def test_modelcard_round_trip(card_path: Path, weights: Path) -> None:
    card = load_card(card_path)
    assert card.weights == weights.resolve()
    assert card.path == card_path.resolve()
    assert card.metrics == {"roc_auc": 0.87, "f1": 0.7}
    out = card_path.parent / "copy" / "card.toml"
    write_card(card, out)
    again = load_card(out)
    assert dataclasses.replace(again, path=card.path) == card
    assert 'weights = "../weights.pt"' in out.read_text()


def test_modelcard_round_trip_of_every_optional_value(tmp_path: Path, weights: Path) -> None:
    card = dataclasses.replace(
        default_card(weights=weights, sha256=sha256_file(weights), path=tmp_path / "card.toml"),
        image=ImageSpec(
            spatial_dims=3, size=(32, 64, 64), channels=1, window=(-1000, 400), encoder="densenet121"
        ),
        classes=(
            ClassSpec("normal", "17621005", 'Normal "as expected"'),
            ClassSpec("abnormal", "263654008", "Abnormal é"),
        ),
        positive_class="abnormal",
        input=InputSelection(modalities=("ct",), series_rule="lowest_series_number"),
    )
    write_card(card, card.path)
    loaded = load_card(card.path)
    assert loaded == card
    assert loaded.image.window == (-1000.0, 400.0)
    assert loaded.input.modalities == ("CT",)


def test_modelcard_default_values() -> None:
    card = load_card(default_card_path())
    assert (card.name, card.version) == ("dfusion-hybrid-demo", "0.1.0")
    assert [(c.code, c.system) for c in card.classes] == [
        ("3898006", "http://snomed.info/sct"),
        ("363346000", "http://snomed.info/sct"),
    ]
    assert card.positive_class == "malignant"
    # the threshold was chosen on the calibrated out-of-fold predictions for 85 % sensitivity, inside its
    # indeterminate band (README "Model": calibration)
    assert card.calibration is not None and card.calibration.target_sensitivity == 0.85
    assert card.calibration.indeterminate is not None
    assert card.calibration.indeterminate[0] <= card.threshold <= card.calibration.indeterminate[1]
    assert 0 < card.threshold < 0.5 and card.metrics["oof_sensitivity"] >= 0.85
    assert card.image == ImageSpec(
        spatial_dims=2, size=(128, 128), channels=1, window=None, encoder="smallcnn", lesion_channel=True
    )
    assert card.segmenter is not None and card.segmenter.parent.name == "default_segmenter"
    assert card.input.modalities == ("DX", "CR")  # what it was trained on: a CT or MR study is not its to read
    loinc = {f.code for f in card.timeline.features if f.kind == "observation"}
    assert {"2345-7", "4548-4", "1988-5", "39156-5", "8480-6"} <= loinc
    assert {f.kind for f in card.timeline.features} == {"observation", "condition", "medication", "encounter"}
    assert (card.timeline.window_days, card.timeline.bin_days, card.timeline.n_bins) == (730, 30, 25)


def test_modelcard_shipped_weights_match_sha256() -> None:
    card = load_card(default_card_path())
    verify_weights(card)
    assert sha256_file(card.weights) == card.sha256
    assert card.weights.parent == default_card_path().parent
    assert card.weights.stat().st_size < 1_000_000


def _edit(card_path: Path, pattern: str, replacement: str) -> None:
    text = card_path.read_text()
    new, n = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert n == 1, pattern
    card_path.write_text(new)


@pytest.mark.parametrize(
    ("pattern", "replacement", "message"),
    [
        (r"^size = .*$", "", "missing key image.size"),
        (r"^threshold = .*$", "threshold = 1.5", "threshold must be a probability"),
        (r"^threshold = .*$", "treshold = 0.5", "unknown key(s) in the top level: treshold"),
        (r"^series_rule = .*$", 'series_rule = "biggest"', "series_rule 'biggest' is unknown"),
        (r"^size = .*$", "size = [128, 128, 128]", "has 3 entries but spatial_dims is 2"),
        (r"^positive_class = .*$", 'positive_class = "cancer"', "positive_class 'cancer' is not one of"),
        (r"^std = 25.0$", "std = 0.0", "std must be > 0"),
        (r"^encoder = .*$", 'encoder = "resnet"', "image.encoder 'resnet' is unknown"),
        (r"^sha256 = .*$", 'sha256 = "abc"', "sha256 must be 64 hex digits"),
        (r"^kind = \"condition\"$", 'kind = "procedure"', "kind 'procedure' is unknown"),
        (r"^card_format = 1$", "card_format = 9", "card_format 9 is not supported"),
        (r"^lesion_channel = false$", 'lesion_channel = "yes"', "lesion_channel must be true or false"),
        (r"^lesion_channel = false$", "lesion_channel = true", "names no `segmenter`"),
    ],
)
def test_modelcard_validation_messages(card_path: Path, pattern: str, replacement: str, message: str) -> None:
    _edit(card_path, pattern, replacement)
    with pytest.raises(ModelCardError) as info:
        load_card(card_path)
    assert message in str(info.value)
    assert str(card_path.resolve()) in str(info.value)  # says which file to fix
    assert isinstance(info.value, InferenceError) and isinstance(info.value, ValueError)


def test_modelcard_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match=r"does not exist.*model init"):
        load_card(tmp_path / "nope.toml")


def test_modelcard_invalid_toml(card_path: Path) -> None:
    card_path.write_text(card_path.read_text() + "\nthis is = = not toml\n")
    with pytest.raises(ModelCardError, match="not valid TOML"):
        load_card(card_path)


def test_modelcard_missing_weights(card_path: Path, weights: Path) -> None:
    weights.unlink()
    card = load_card(card_path)  # a card is readable without its checkpoint
    with pytest.raises(
        ModelCardError, match=r"weights file .*weights\.pt.* does not exist.*model init"
    ) as info:
        verify_weights(card)
    assert not isinstance(info.value, WeightsMismatchError)


def test_modelcard_sha256_mismatch_names_file_and_fix(card_path: Path, weights: Path) -> None:
    weights.write_bytes(weights.read_bytes() + b"!")
    card = load_card(card_path)
    with pytest.raises(WeightsMismatchError) as info:
        verify_weights(card)
    text = str(info.value)
    assert str(weights.resolve()) in text and card.sha256 in text and sha256_file(weights) in text
    assert "dicom-fusion model init" in text


def test_modelcard_value_objects_validate_in_constructor() -> None:
    with pytest.raises(ModelCardError, match="averaging values of different codes"):
        TimelineFeature("x", "observation", "http://loinc.org", "*", None, 0.0, 1.0)
    with pytest.raises(ModelCardError, match=r"input\.modalities is empty"):
        InputSelection(modalities=())
    with pytest.raises(ValueError, match="window low must be below high"):
        ImageSpec(spatial_dims=2, size=(8, 8), channels=1, window=(5, 5), encoder="smallcnn")


def test_modelcard_toml_is_plain_tomllib(card_path: Path) -> None:
    data = tomllib.loads(card_to_toml(load_card(card_path)))
    assert data["classes"][1]["code"] == "363346000"
    assert "window" not in data["image"]  # None is omitted, not written as a sentinel


def test_shipped_cards_are_written_back_unchanged(tmp_path: Path) -> None:
    from dicom_fusion.inference.card.segmenter import (
        default_segmenter_path,
        load_segmenter_card,
        segmenter_card_to_toml,
        write_segmenter_card,
    )

    model = load_card(default_card_path())
    assert card_to_toml(model) == default_card_path().read_text()
    segmenter = load_segmenter_card(default_segmenter_path())
    assert segmenter_card_to_toml(segmenter, segmenter.path) == default_segmenter_path().read_text()
    write_card(model, tmp_path / "model.toml")
    write_segmenter_card(segmenter, tmp_path / "segmenter.toml")
    assert dataclasses.replace(load_card(tmp_path / "model.toml"), path=model.path) == model
    again = load_segmenter_card(tmp_path / "segmenter.toml")
    assert dataclasses.replace(again, path=segmenter.path) == segmenter


@pytest.mark.parametrize(
    ("pattern", "replacement", "message"),
    [
        (r"^channels = 1$", "channels = true", "image.channels must be a positive integer, got True"),
        (r"^window_days = .*$", 'window_days = "730"', "timeline.window_days must be a positive integer"),
        (r"^mean = 105.0$", 'mean = "105"', "timeline.features[0].mean must be a finite number"),
        (r"^code = \"3898006\"$", 'code = " "', "classes[0].code must be a non-empty string"),
        (r"^series_rule = .*$", 'series_rule = "biggest"\nmodality = "CT"',
         "unknown key(s) in input: modality (allowed: modalities, series_rule)"),
        (r"^std = 25.0$", "std = 25.0\nsd = 1", "unknown key(s) in timeline.features[0]: sd"),
        (r"^name = \"dfusion-hybrid-demo\"$", 'path = "elsewhere.toml"',
         "unknown key(s) in the top level: path"),
        (r"^encoder = .*$", 'encoder = "smallcnn"\nwindow = [1.0, 2.0, 3.0]',
         "image.window must have 2 entries"),
    ],
)
def test_modelcard_type_errors_name_the_key_path(
    card_path: Path, pattern: str, replacement: str, message: str
) -> None:
    _edit(card_path, pattern, replacement)
    with pytest.raises(ModelCardError) as info:
        load_card(card_path)
    assert message in str(info.value) and str(card_path.resolve()) in str(info.value)


def test_modelcard_omitted_optional_key_is_none(card_path: Path) -> None:
    _edit(card_path, r'^unit = "mg/dL"$', "")  # TOML has no null: None is written by leaving the key out
    assert load_card(card_path).timeline.features[0].unit is None


def test_modelcard_constructor_and_replace_raise_modelcard_error(weights: Path, tmp_path: Path) -> None:
    card = default_card(weights=weights, sha256=sha256_file(weights), path=tmp_path / "card.toml")
    with pytest.raises(ModelCardError, match=r"threshold must be a probability in \[0, 1\], got 2.0"):
        dataclasses.replace(card, threshold=2)
    with pytest.raises(ModelCardError, match="names no `segmenter`"):
        dataclasses.replace(card, image=dataclasses.replace(card.image, lesion_channel=True))
    with pytest.raises(ModelCardError, match=r"channels must be a positive integer, got 0"):
        ImageSpec(2, (8, 8), 0, None, "smallcnn")  # positional arguments are named by their field
    with pytest.raises(ModelCardError, match=r"unknown key\(s\) in ClassSpec\(\): colour"):
        ClassSpec("a", "1", "A", colour="red")  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.threshold = 0.1  # type: ignore[misc]
    assert dataclasses.replace(card, sha256=card.sha256.upper()).sha256 == card.sha256
