"""The DICOM Segmentation of the lesion and its SR measurement group."""
