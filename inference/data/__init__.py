"""Inputs of the networks: DICOM files -> image array, EHR events -> timeline tensor, cohort folders."""
