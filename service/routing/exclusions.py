"""Series never processed, whatever the routes say.

A PACS forwards everything it receives, including what this service sent it (its SR, SEG and
Grad-CAM Secondary Capture looped back through the PACS's auto-routing), documents and
non-image objects (SR, KO, PR, SEG, RT, dose reports, PDFs, waveforms), localizers / scouts, and QC
phantoms. None of these is a study a model should read; an output looped back must never start a job.
They are excluded before any route is matched; a study left with no series is `ignored` with the
reason, not failed.
"""
from __future__ import annotations

from dicom_fusion.service.outputs.identity import MANUFACTURER
from dicom_fusion.service.routing.headers import SeriesHeader, StudyHeader

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: SOP class UID prefixes of objects that are not images a model reads.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.": "structured report",  # every SR, KO (88.59), dose SR (88.67)
    "1.2.840.10008.5.1.4.1.1.11.": "presentation state",
    "1.2.840.10008.5.1.4.1.1.66": "segmentation / registration / raw data",
    "1.2.840.10008.5.1.4.1.1.481.": "radiotherapy object",
    "1.2.840.10008.5.1.4.1.1.104.": "encapsulated document",
    "1.2.840.10008.5.1.4.1.1.9.": "waveform",
    "1.2.840.10008.5.1.4.1.1.67": "real world value map",
    "1.2.840.10008.5.1.4.1.1.68.": "surface",
}
#: Modalities of the same objects, for senders that use a generic SOP class.
NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "SEG", "REG", "FID", "RTSTRUCT", "RTPLAN", "RTDOSE",
                                  "RTRECORD", "RTIMAGE", "DOC", "RWV", "PLAN", "AU", "ECG", "HD"})
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT"})


def series_exclusion(series: SeriesHeader, *, refuse_burned_in: bool = False) -> str | None:
    """Why a series is never processed, or None. The reason names the attribute, never patient data."""
    if series.manufacturer.strip().lower() == MANUFACTURER and series.sop_class_uid.startswith(SECONDARY_CAPTURE):
        # our Grad-CAM overlay; our SR and SEG are non-images below. Synthetic studies (`dicom-fusion synth`)
        # also name us as Manufacturer but are DX images: those are read.
        return f"our own output (Manufacturer {MANUFACTURER}, Secondary Capture)"
    for prefix, what in NON_IMAGE_SOP_CLASSES.items():
        if series.sop_class_uid.startswith(prefix):
            return f"not an image: {what} (SOP Class {series.sop_class_uid})"
    if series.modality in NON_IMAGE_MODALITIES:
        return f"not an image: Modality {series.modality}"
    if LOCALIZER_IMAGE_TYPES & set(series.image_type):
        return "localizer / scout (ImageType " + "\\".join(series.image_type) + ")"
    if refuse_burned_in and series.burned_in_annotation == "YES":
        return "BurnedInAnnotation YES"
    return None


def study_exclusion(study: StudyHeader) -> str | None:
    """Why a whole study is never processed (a QC phantom), or None."""
    if study.phantom:
        return "QC phantom (patient matches routing.phantom_pattern)"
    return None
