"""Training: settings, the fit loop, cross-validation, the classifier and segmenter runs."""
