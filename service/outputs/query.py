"""C-FIND SCU: how many instances the PACS holds of a study, per series (Study Root Query/Retrieve).

``completion.mode = "pacs"`` (``jobs/completion.py``) asks this when the first instance of a study
arrives: the study is complete once the ledger holds what the PACS says it has. One association, two
queries: STUDY level (``NumberOfStudyRelatedInstances``: does the PACS know the study, and its total)
then SERIES level (``NumberOfSeriesRelatedInstances`` per series). Series the PACS marks as ours
(``Manufacturer`` = ``outputs/identity.MANUFACTURER`` and Modality SR, SEG or OT: an SR, SEG or Grad-CAM
SC we delivered earlier) are left out: they never come back to the listener, so waiting for them would
always end at the maximum wait. (Synthetic studies also name us as Manufacturer but are DX images.)

=========================================  ==========================================================
What happened                               Result
=========================================  ==========================================================
both queries answered, study found          ``StudyCounts`` (total, per series, ours left out)
study level: no match                       ``None`` (the PACS does not know the study, yet)
no SERIES-level answer (PACS without it)    ``StudyCounts`` with the study total and no series
refused / unreachable / rejected / timeout  ``PacsQueryError`` (the message says what to check)
C-FIND failure status, no context accepted  ``PacsQueryError``
=========================================  ==========================================================

Every step is bounded by ``timeout`` (connect, negotiation, each response). Logs and errors name the
peer and statuses only, never patient data (the query carries the Study Instance UID alone).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from dicom_fusion.service.errors import DeliveryError, PacsQueryError
from dicom_fusion.service.outputs.dispatch import DicomNode, _application_entity, _associate, _close
from dicom_fusion.service.outputs.identity import MANUFACTURER

__all__ = ["StudyCounts", "query_study_counts"]

LOGGER = logging.getLogger(__name__)

_PENDING = (0xFF00, 0xFF01)
#: the modalities of what we deliver (outputs/sr, seg, sc); with our Manufacturer they mark our own series
_OUR_MODALITIES = frozenset({"SR", "SEG", "OT"})


@dataclass(frozen=True)
class StudyCounts:
    """What the PACS holds of one study: its instance total and, when it answered at SERIES level,
    the count of each series (our own output series left out of both)."""

    total: int
    series: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.total, bool) or not isinstance(self.total, int) or self.total < 0:
            raise ValueError(f'Argument "total" must be an int >= 0, got {self.total!r}.')


def query_study_counts(study_uid: str, target: DicomNode, *, calling_ae: str,
                       timeout: float = 5.0) -> StudyCounts | None:
    """The instance counts ``target`` holds of ``study_uid``, or None when it does not know the study.

    Raises:
        ValueError: ``study_uid`` empty or ``timeout`` not positive (nothing was sent).
        PacsQueryError: the PACS could not be asked or did not answer (table in the module docstring).
    """
    if not isinstance(study_uid, str) or not study_uid.strip():
        raise ValueError(f'Argument "study_uid" must be a non-empty str, got {study_uid!r}.')
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f'Argument "timeout" must be a positive number of seconds, got {timeout!r}.')
    ae = _application_entity(calling_ae, timeout)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc: Association | None = None
    answered = False
    try:
        try:
            assoc = _associate(ae, target, calling_ae, timeout)
        except DeliveryError as exc:
            raise PacsQueryError(f"C-FIND: {exc.message}") from exc
        studies = list(_find(assoc, _study_query(study_uid), target, timeout))
        if not studies:
            answered = True
            return None
        series = list(_find(assoc, _series_query(study_uid), target, timeout))
        answered = True
        return _counts(studies[0], series)
    finally:
        _close(assoc, graceful=answered)
        ae.shutdown()


def _study_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study_uid
    ds.NumberOfStudyRelatedInstances = ""
    return ds


def _series_query(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = ""
    ds.NumberOfSeriesRelatedInstances = ""
    ds.Modality = ""
    ds.Manufacturer = ""
    return ds


def _find(assoc: Association, query: Dataset, target: DicomNode, timeout: float) -> Iterator[Dataset]:
    """The identifiers of the pending responses; raises PacsQueryError unless the query ends in success."""
    level = query.QueryRetrieveLevel
    try:
        responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
    except ValueError as exc:  # pynetdicom: no accepted presentation context
        raise PacsQueryError(
            f"The PACS {target} accepts no Study Root C-FIND from us ({exc}): allow queries from our "
            "AE title on the PACS (Orthanc: DicomAlwaysAllowFind or a DicomModalities entry), or use "
            "completion.mode = \"quiet\".") from exc
    for status, identifier in responses:
        code = status.get("Status") if status else None
        if code is None:
            raise PacsQueryError(
                f"No C-FIND ({level}) response from {target} within {timeout:g} s, or the association "
                "was aborted: check the network and the PACS logs.")
        if code in _PENDING:
            if identifier is not None:
                yield identifier
            continue
        if code == 0x0000:
            return
        raise PacsQueryError(
            f"The PACS {target} answered the {level} C-FIND with status 0x{int(code):04X}: check that it "
            "supports Study Root queries at this level and its logs.")


def _count(ds: Dataset, keyword: str) -> int | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _counts(study: Dataset, series: list[Dataset]) -> StudyCounts:
    per_series: dict[str, int] = {}
    ours = 0
    for ds in series:
        uid, n = str(ds.get("SeriesInstanceUID", "")), _count(ds, "NumberOfSeriesRelatedInstances")
        if not uid or n is None:
            continue
        if str(ds.get("Manufacturer", "")) == MANUFACTURER and str(ds.get("Modality", "")) in _OUR_MODALITIES:
            ours += n
            continue
        per_series[uid] = n
    total = _count(study, "NumberOfStudyRelatedInstances")
    if total is None:  # a PACS that leaves the optional key empty: the series sum is all we have
        total = sum(per_series.values())
    else:
        total = max(total - ours, sum(per_series.values()))
    return StudyCounts(total=total, series=per_series)
