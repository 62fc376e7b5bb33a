"""The DICOM Structured Report (TID 1500): `build` writes it, `reader` checks what was written."""
