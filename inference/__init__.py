"""dicom-fusion inference: model card, transforms, timeline tensors, HybridNet, predict, synthetic cohort."""
