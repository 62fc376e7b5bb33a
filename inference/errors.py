"""Error hierarchy of the inference package.

Each error is raised where its cause is known, with a message that says what to do. The service maps
them to job states at its boundary: `NoSuitableSeriesError` and `ImageDecodeError` are properties of
the study (retrying will not help), `ModelCardError` / `WeightsMismatchError` are deployment faults
(the worker must not serve until the model files are fixed).
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class of every error raised by `dicom_fusion.inference`."""


class NoSuitableSeriesError(InferenceError):
    """No series of the study matches the model card's input selection (modality, pixel data)."""


class ImageDecodeError(InferenceError):
    """The pixel data of the selected instances cannot be decoded (codec missing or data corrupt)."""


class ModelCardError(InferenceError, ValueError):
    """The model card is missing, unreadable or holds invalid values.

    Also a `ValueError`, because the card's value objects raise it from their constructors for values
    that are out of range, the way a constructor normally does.
    """


class WeightsMismatchError(ModelCardError):
    """The weights file does not match the card: wrong sha256, or tensors that do not fit the network."""


__all__ = [
    "ImageDecodeError",
    "InferenceError",
    "ModelCardError",
    "NoSuitableSeriesError",
    "WeightsMismatchError",
]
