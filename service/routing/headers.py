"""What routing reads of a study: a few header attributes per series, from one stored file per series.

Routes match on series headers (Modality, ImageType, descriptions, ...) and on a few study values
(calling AE, patient age, instance counts). They are read once, when the study completes, from the
first spooled file of each series (`stop_before_pixels`, named tags only: a 5 000-instance study costs
one header read per series, not per instance). Patient values needed by rules are reduced on read to
what the rule needs (an age in years, whether the patient matches the QC-phantom pattern), so no name,
ID or birth date is kept, logged or stored.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import regex
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import func, select

from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, Series, Study

_TAGS = ("Modality", "SOPClassUID", "ImageType", "BodyPartExamined", "SeriesDescription", "ProtocolName",
         "StudyDescription", "StationName", "Manufacturer", "BurnedInAnnotation", "SeriesNumber",
         "SeriesInstanceUID", "StudyInstanceUID", "NumberOfFrames", "PatientAge", "PatientBirthDate",
         "StudyDate", "PatientName", "PatientID")


@dataclass(frozen=True)
class SeriesHeader:
    """The attributes routes may match, of one series (read from its first stored instance)."""

    series_uid: str
    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    body_part: str
    series_description: str
    protocol_name: str
    station_name: str
    manufacturer: str
    burned_in_annotation: str
    series_number: int | None
    instances: int
    frames: int  # slices: instances × frames per instance


@dataclass(frozen=True)
class StudyHeader:
    """A study as routing sees it: study-level values and its series."""

    study_uid: str
    study_description: str
    calling_ae: str
    patient_age_years: float | None
    phantom: bool  # patient name or ID matches `routing.phantom_pattern`
    series: tuple[SeriesHeader, ...]

    @property
    def instances(self) -> int:
        return sum(s.instances for s in self.series)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _age_years(ds: Dataset) -> float | None:
    """PatientAge ("045Y", "006M", "012W", "003D"), else StudyDate − PatientBirthDate; None if unknown."""
    age = _text(ds, "PatientAge")
    if len(age) == 4 and age[:3].isdigit() and age[3] in "DWMY":
        return int(age[:3]) / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[age[3]]
    try:
        born, studied = _text(ds, "PatientBirthDate"), _text(ds, "StudyDate")
        b = date(int(born[:4]), int(born[4:6]), int(born[6:8]))
        s = date(int(studied[:4]), int(studied[4:6]), int(studied[6:8]))
    except (ValueError, IndexError):
        return None
    return (s - b).days / 365.25


def _is_phantom(ds: Dataset, pattern: regex.Pattern[str] | None, timeout: float) -> bool:
    if pattern is None:
        return False
    try:
        return any(pattern.search(_text(ds, k), timeout=timeout) for k in ("PatientName", "PatientID"))
    except TimeoutError:
        return False


def _series_header(ds: Dataset, series_uid: str, instances: int) -> SeriesHeader:
    image_type = ds.get("ImageType", [])
    values = [str(v).strip().upper() for v in (image_type if isinstance(image_type, Sequence) and
                                                not isinstance(image_type, str) else [image_type]) if v]
    number = ds.get("SeriesNumber")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    try:
        series_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return SeriesHeader(
        series_uid=series_uid, modality=_text(ds, "Modality").upper(), sop_class_uid=_text(ds, "SOPClassUID"),
        image_type=tuple(values), body_part=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"), protocol_name=_text(ds, "ProtocolName"),
        station_name=_text(ds, "StationName"), manufacturer=_text(ds, "Manufacturer"),
        burned_in_annotation=_text(ds, "BurnedInAnnotation").upper(), series_number=series_number,
        instances=instances, frames=instances * max(frames, 1))


def _read(path: Path) -> Dataset | None:
    try:
        return dcmread(path, stop_before_pixels=True, specific_tags=list(_TAGS))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return None


def headers_from_files(files: Iterable[Path], *, calling_ae: str = "",
                       phantom_pattern: regex.Pattern[str] | None = None,
                       timeout: float = 0.05) -> StudyHeader:
    """The study header of DICOM files on disk (`routes explain PATH`); files of several studies are
    refused with a ValueError naming them."""
    first: dict[str, tuple[Dataset, int]] = {}
    studies: set[str] = set()
    for path in sorted(files):
        ds = _read(path)
        if ds is None:
            continue
        studies.add(_text(ds, "StudyInstanceUID"))
        uid = _text(ds, "SeriesInstanceUID")
        ds_first, n = first.get(uid, (ds, 0))
        first[uid] = (ds_first, n + 1)
    if not first:
        raise ValueError("no readable DICOM file among the paths given")
    if len(studies) > 1:
        raise ValueError(f"the files belong to {len(studies)} studies; explain one study at a time")
    return _study_header(first, calling_ae, phantom_pattern, timeout)


def _study_header(first: dict[str, tuple[Dataset, int]], calling_ae: str,
                  phantom_pattern: regex.Pattern[str] | None, timeout: float) -> StudyHeader:
    datasets = [ds for ds, _ in first.values()]
    lead = datasets[0]
    return StudyHeader(
        study_uid=_text(lead, "StudyInstanceUID"), study_description=_text(lead, "StudyDescription"),
        calling_ae=calling_ae, patient_age_years=_age_years(lead),
        phantom=any(_is_phantom(ds, phantom_pattern, timeout) for ds in datasets),
        series=tuple(_series_header(ds, uid, n) for uid, (ds, n) in first.items()))


def headers_from_ledger(ledger: Ledger, study_id: int, *, phantom_pattern: regex.Pattern[str] | None = None,
                        timeout: float = 0.05) -> StudyHeader | None:
    """The study header from the ledger (series, counts, calling AE) and the first stored file of each
    series; None when the study has no readable file."""
    with ledger.session() as s:
        study = s.get(Study, study_id)
        if study is None:
            return None
        rows = s.execute(select(Series.series_uid, func.min(Instance.path), func.count(Instance.id))
                         .join(Instance, Instance.series_id == Series.id)
                         .where(Series.study_id == study_id).group_by(Series.id)).all()
        calling_ae = study.calling_ae
    first: dict[str, tuple[Dataset, int]] = {}
    for series_uid, path, count in rows:
        ds = _read(Path(path))
        if ds is not None:
            first[series_uid] = (ds, int(count))
    if not first:
        return None
    return _study_header(first, calling_ae, phantom_pattern, timeout)
