"""The listener's well-formedness walk (ingest/wellformed.py) on pydicom's real test files: every intact
file is accepted with pydicom's element count, every cut of an image is refused (with the listener's
UID check, as the handler runs them), and bytes whose encoding is not the declared transfer syntax are
refused."""
from __future__ import annotations

import struct
import warnings
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    UID,
    JPEGBaseline8Bit,
)

from dicom_fusion.service.errors import MalformedInstanceError
from dicom_fusion.service.ingest.listener import check_received
from dicom_fusion.service.ingest.wellformed import MAX_DEPTH, check_dataset, check_part10

INTACT = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
          "JPEG-lossy.dcm", "MR_small_RLE.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm",
          "image_dfl.dcm", "rtplan.dcm", "test-SR.dcm", "UN_sequence.dcm", "nested_priv_SQ.dcm",
          "waveform_ecg.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"]
IMAGES = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
          "JPEG-lossy.dcm", "SC_rgb_rle_2frame.dcm"]


def _file(name: str) -> Path:
    return Path(get_testdata_file(name))


def _split(raw: bytes) -> tuple[bytes, str]:
    """(data set bytes, transfer syntax) of a Part 10 file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(BytesIO(raw), stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return raw[meta_end:], str(ds.file_meta.TransferSyntaxUID)


def _part10(body: bytes, ts: str, sop_class: str = "1.2.840.10008.5.1.4.1.1.2",
            sop_uid: str = "1.2.826.0.1.3680043.8.498.1") -> bytes:
    """Part 10 bytes as pynetdicom's ``encoded_dataset()`` builds them: meta declaring ``ts`` + body."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.2"
    fp = BytesIO()
    write_file_meta_info(fp, meta, enforce_standard=True)  # type: ignore[arg-type]
    return b"\0" * 128 + b"DICM" + fp.getvalue() + body


@pytest.mark.parametrize("name", INTACT)
def test_the_walk_files_an_instance_as_pydicom_reads_it(name: str) -> None:
    """check_received takes the filing values from the walk (one pass): they are pydicom's, in every
    transfer syntax (implicit, big endian, deflated, encapsulated), whenever pydicom finds them all."""
    from dicom_fusion.service.ingest.listener import parse_header

    raw = _file(name).read_bytes()
    try:
        expected = parse_header(raw)
    except MalformedInstanceError:  # a test file without Study/Series UID: the walk refuses it too
        with pytest.raises(MalformedInstanceError):
            check_received(raw)
        return
    assert check_received(raw) == expected


def test_filing_values_are_checked_at_the_boundary() -> None:
    """A missing or invalid UID in the walk's values is refused as before (0xC000), the reason naming
    the attribute; Modality is optional and cut to 16 characters."""
    raw = _file("CT_small.dcm").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(BytesIO(raw))
    del ds.SeriesInstanceUID
    fp = BytesIO()
    ds.save_as(fp)
    with pytest.raises(MalformedInstanceError, match="SeriesInstanceUID is missing"):
        check_received(fp.getvalue())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the invalid UI value it is asked to write
        ds.SeriesInstanceUID = "1.2.3.abc"
        fp = BytesIO()
        ds.save_as(fp)
    with pytest.raises(MalformedInstanceError, match="SeriesInstanceUID .* is not a valid DICOM UID"):
        check_received(fp.getvalue())
    ds.SeriesInstanceUID, ds.Modality = "1.2.3.4", "CT"
    del ds.Modality
    fp = BytesIO()
    ds.save_as(fp)
    assert check_received(fp.getvalue()).modality == ""


@pytest.mark.parametrize("name", INTACT)
def test_intact_files_are_accepted_with_pydicoms_element_count(name: str) -> None:
    raw = _file(name).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(_file(name))
    structure = check_part10(raw)
    assert structure.transfer_syntax == ds.file_meta.TransferSyntaxUID
    assert structure.top_level == len(ds)
    if ds.file_meta.TransferSyntaxUID.is_encapsulated and "PixelData" in ds:
        assert structure.fragments >= 2  # offset table + at least one frame


def test_nested_and_fragmented_structure_is_seen() -> None:
    assert check_part10(_file("examples_ybr_color.dcm").read_bytes()).fragments == 31
    assert check_part10(_file("rtplan.dcm").read_bytes()).max_depth >= 2
    assert check_part10(_file("nested_priv_SQ.dcm").read_bytes()).max_depth >= 4


def _top_level_ends(raw: bytes) -> list[tuple[int, int]]:
    """(tag, end offset in `raw`) of each top-level element, read by pydicom's element generator."""
    body, ts = _split(raw)
    start = len(raw) - len(body)
    syntax = UID(ts)
    fp = BytesIO(body)
    ends = []
    for el in data_element_generator(fp, is_implicit_VR=syntax.is_implicit_VR,
                                     is_little_endian=syntax.is_little_endian):
        ends.append((int(el.tag), start + fp.tell()))
    return ends


def _cuts(body_start: int, size: int, dense_until: int) -> list[int]:
    """Every offset up to `dense_until` (the headers), then every 37th byte to the end."""
    return list(range(body_start, min(dense_until, size))) + list(range(dense_until, size, 37))


@pytest.mark.parametrize("name", IMAGES)
def test_every_cut_of_an_image_is_refused(name: str) -> None:
    """Refused unless the cut falls exactly between two top-level elements *after* the pixel data (the
    trailing padding (FFFC,FFFC) some writers add): what is left is a complete image, element by element."""
    raw = _file(name).read_bytes()
    ends = _top_level_ends(raw)
    pixel_end = next(end for tag, end in ends if tag == 0x7FE00010)
    after_pixels = {end for _, end in ends if pixel_end <= end < len(raw)}
    body, _ = _split(raw)
    body_start = len(raw) - len(body)
    pixel_at = raw.rfind(b"\xe0\x7f\x10\x00") if "bigendian" not in name else raw.rfind(b"\x7f\xe0\x00\x10")
    assert pixel_at > body_start
    cuts = _cuts(body_start, len(raw), pixel_at + 64)
    assert len(cuts) > 200
    accepted = []
    for cut in cuts:
        try:
            check_received(raw[:cut])
        except MalformedInstanceError as exc:
            assert "CompressedSamples" not in str(exc) and "^" not in str(exc)  # no values in the reason
            continue
        accepted.append(cut)
    assert set(accepted) <= after_pixels, sorted(set(accepted) - after_pixels)
    check_received(raw)  # the whole file passes


def test_cuts_of_a_non_image_are_refused_unless_between_top_level_elements() -> None:
    """A cut exactly between two top-level elements leaves a shorter data set that is complete element
    by element; every other cut (inside any element, sequence or item) is refused."""
    raw = _file("rtplan.dcm").read_bytes()
    body, ts = _split(raw)
    start = len(raw) - len(body)
    boundaries = {end for _, end in _top_level_ends(raw)}
    accepted = set()
    for cut in range(start + 1, len(raw)):
        try:
            check_part10(raw[:cut])
        except MalformedInstanceError:
            continue
        accepted.add(cut)
    assert ts == ImplicitVRLittleEndian
    assert accepted == boundaries - {len(raw)}
    assert len(accepted) > 10


@pytest.mark.parametrize("name,declared", [
    ("MR_small.dcm", ImplicitVRLittleEndian),       # explicit bytes, implicit declared
    ("MR_small_implicit.dcm", ExplicitVRLittleEndian),  # implicit bytes, explicit declared
    ("MR_small.dcm", ExplicitVRBigEndian),          # little endian bytes, big endian declared
    ("MR_small_bigendian.dcm", ExplicitVRLittleEndian),  # big endian bytes, little endian declared
    ("CT_small.dcm", JPEGBaseline8Bit),             # native pixel data, compressed declared
    ("JPEG2000.dcm", ExplicitVRLittleEndian),       # encapsulated pixel data, native declared
    ("MR_small.dcm", DeflatedExplicitVRLittleEndian),  # plain bytes, deflated declared
    ("image_dfl.dcm", ExplicitVRLittleEndian),      # deflated bytes, plain declared
])
def test_declared_transfer_syntax_must_match_the_encoding(name: str, declared: str) -> None:
    raw = _file(name).read_bytes()
    body, actual = _split(raw)
    assert actual != declared
    check_part10(_part10(body, actual))  # the same bytes under their real syntax pass
    with pytest.raises(MalformedInstanceError, match="not well-formed|deflate"):
        check_part10(_part10(body, declared))


def test_sc_rgb_jpeg_declares_jpeg_but_is_implicit_vr() -> None:
    """A real mis-declared file (pydicom reads it only by guessing): refused, the reason says why."""
    with pytest.raises(MalformedInstanceError, match="not explicit VR as declared"):
        check_part10(_file("SC_rgb_jpeg.dcm").read_bytes())


def _el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


SQ_OPEN = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF)
ITEM_OPEN = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_CLOSE = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
SQ_CLOSE = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
HEAD = _el(0x0008, 0x0060, b"CS", b"SR")


@pytest.mark.parametrize("body,ok", [
    (HEAD + SQ_OPEN + ITEM_OPEN + _el(0x0040, 0xA010, b"CS", b"CONTAINS") + ITEM_CLOSE + SQ_CLOSE, True),
    (HEAD + SQ_OPEN + ITEM_OPEN + _el(0x0040, 0xA010, b"CS", b"CONTAINS") + ITEM_CLOSE, False),  # no SQ end
    (HEAD + SQ_OPEN + ITEM_OPEN + _el(0x0040, 0xA010, b"CS", b"CONTAINS") + SQ_CLOSE, False),  # no item end
    (HEAD + SQ_OPEN + _el(0x0040, 0xA010, b"CS", b"CONTAINS") + SQ_CLOSE, False),  # element where an item belongs
    (HEAD + ITEM_CLOSE, False),  # a delimiter in a data set
    (HEAD + SQ_OPEN * 1000 + ITEM_OPEN + (ITEM_CLOSE + SQ_CLOSE) * 1000, False),  # items missing in between
    (HEAD + (SQ_OPEN + ITEM_OPEN) * 1000 + (ITEM_CLOSE + SQ_CLOSE) * 1000, True),  # 1000 deep: fine
    (HEAD + (SQ_OPEN + ITEM_OPEN) * MAX_DEPTH + (ITEM_CLOSE + SQ_CLOSE) * MAX_DEPTH, False),  # too deep
    # a defined-length sequence whose item overruns it
    (HEAD + struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 16) + struct.pack("<HHI", 0xFFFE, 0xE000, 10)
     + _el(0x0040, 0xA010, b"CS", b"AB") + b"\0\0", False),
    # encapsulated pixel data: offset table + one fragment + end; then the end missing; then a cut fragment
    (HEAD + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
     + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9" + SQ_CLOSE, True),
    (HEAD + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
     + struct.pack("<HHI", 0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9", False),
    (HEAD + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000, 0)
     + struct.pack("<HHI", 0xFFFE, 0xE000, 6) + b"\xff\xd8\xff\xd9" + SQ_CLOSE, False),
    (HEAD + b"\0\0", False),  # trailing bytes that cannot be an element
    (HEAD + bytes(16), False),  # trailing zeros: no valid VR
    (HEAD + _el(0x0028, 0x0010, b"US", b"\x02\x00"), False),  # Rows but no pixels (cut before them)
], ids=["closed", "no-seq-end", "no-item-end", "no-item", "stray-delimiter", "missing-items", "deep-1000",
        "too-deep", "item-overruns-seq", "fragments", "fragments-no-end", "fragment-cut", "trailing-2",
        "trailing-zeros", "rows-no-pixels"])
def test_hand_built_structures(body: bytes, ok: bool) -> None:
    ts = "1.2.840.10008.1.2.4.50" if b"\xe0\x7f\x10\x00" in body else ExplicitVRLittleEndian
    if ok:
        check_dataset(body, ts)
    else:
        with pytest.raises(MalformedInstanceError):
            check_dataset(body, ts)


def test_unknown_transfer_syntax_and_missing_prefix_are_refused() -> None:
    body, _ = _split(_file("MR_small.dcm").read_bytes())
    with pytest.raises(MalformedInstanceError, match="not one this service knows"):
        check_part10(_part10(body, "1.2.3.4.5"))
    with pytest.raises(MalformedInstanceError, match="DICM"):
        check_part10(body)
