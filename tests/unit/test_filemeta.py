"""The listener's own encoding of a received instance is byte-identical to pynetdicom's."""
from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicom_fusion.service.ingest.filemeta import PREAMBLE, file_meta_bytes, received_file


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.33", "1.2.840.10008.1.2"),  # odd: padded with NUL
    ("1.2.840.10008.5.1.4.1.1.4", "2.25." + "9" * 59, "1.2.840.10008.1.2.4.50"),  # a 64-character UID
])
def test_file_meta_is_pynetdicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    reference = encode_file_meta(create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance),
                                                  transfer_syntax=UID(syntax)))
    assert file_meta_bytes(sop_class, sop_instance, syntax) == reference


def test_received_file_is_what_encoded_dataset_returns() -> None:
    from pynetdicom.events import Event

    dataset = b"\x08\x00\x16\x00UI\x1a\x001.2.840.10008.5.1.4.1.1.2\x00"
    request = SimpleNamespace(AffectedSOPClassUID=UID("1.2.840.10008.5.1.4.1.1.2"),
                              AffectedSOPInstanceUID=UID("1.2.3.4.5"), DataSet=BytesIO(dataset))
    context = SimpleNamespace(transfer_syntax=UID("1.2.840.10008.1.2.1"))
    event = SimpleNamespace(request=request, context=context)
    ours = received_file(event, "1.2.3.4.5")
    assert ours.startswith(PREAMBLE) and ours.endswith(dataset)
    # pynetdicom's own method on the same request and context
    theirs = Event.encoded_dataset(SimpleNamespace(request=request, context=context,  # type: ignore[arg-type]
                                                   file_meta=Event.file_meta.fget(event)))  # type: ignore[attr-defined]
    assert ours == theirs
