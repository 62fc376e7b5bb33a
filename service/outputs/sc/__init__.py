"""The Grad-CAM overlay as a DICOM Secondary Capture."""
