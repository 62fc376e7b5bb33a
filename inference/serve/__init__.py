"""Serving: predictor, batched prediction, explanations, lesion segmentation, lesion channel."""
