"""The streaming multipart/related parser of STOW-RS (service/ingest/multipart.py).

Every well-formed body is fed whole, byte by byte and cut at every position into two chunks (and at random
positions into many): the parts must come out identical each time, whatever the chunking. Malformed and
truncated bodies must raise, naming where they ended.
"""
from __future__ import annotations

import random

import pytest

from dicom_fusion.service.ingest.multipart import (
    MultipartError,
    MultipartParser,
    check_boundary,
    parse_content_type,
)

B = "0f3cf5c0-70e0-41ef"


class Collect:
    """A receiver that records (headers, content) per part and checks the call order."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, str], bytes]] = []
        self._open: tuple[dict[str, str], bytearray] | None = None
        self.chunks = 0

    def start(self, headers: dict[str, str]) -> None:
        assert self._open is None, "start() before the previous part ended"
        self._open = (headers, bytearray())

    def data(self, chunk: bytes) -> None:
        assert self._open is not None and chunk, "data() outside a part, or empty"
        self._open[1].extend(chunk)
        self.chunks += 1

    def end(self) -> None:
        assert self._open is not None
        self.parts.append((self._open[0], bytes(self._open[1])))
        self._open = None


def parse(body: bytes, chunks: list[int] | None = None, boundary: str = B) -> Collect:
    """Feed ``body`` cut at the positions ``chunks`` (sorted offsets), then close."""
    out = Collect()
    p = MultipartParser(boundary, out)
    cuts = [0, *(chunks or []), len(body)]
    for a, b in zip(cuts, cuts[1:], strict=False):
        p.feed(body[a:b])
    p.close()
    return out


def body(parts: list[bytes], *, nl: bytes = b"\r\n", preamble: bytes = b"", epilogue: bytes = b"",
         ctype: bytes = b"application/dicom", boundary: str = B) -> bytes:
    d = b"--" + boundary.encode()
    out = bytearray(preamble + (nl if preamble else b""))
    for content in parts:
        out += d + nl + b"Content-Type: " + ctype + nl + nl + content + nl
    out += d + b"--" + epilogue
    return bytes(out)


# contents that stress the delimiter search: line ends, dashes, a prefix of the delimiter, CR at the end
CONTENTS = [b"DICM" + bytes(range(256)) * 3, b"", b"\r\n", b"\r", b"\n--" + B[:-1].encode() + b"x",
            b"--" + B.encode() + b"-not-at-a-line-start", b"ends with CR\r", b"\r\n\r\n--\r\n--"]


@pytest.mark.parametrize("nl", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_every_two_chunk_cut_gives_the_same_parts(nl: bytes) -> None:
    # bare-LF framing cannot carry a content ending in CR (see test_a_content_ending_in_cr_needs_crlf)
    expected = CONTENTS if nl == b"\r\n" else [c for c in CONTENTS if not c.endswith(b"\r")]
    raw = body(expected, nl=nl)
    whole = parse(raw)
    assert [c for _, c in whole.parts] == expected
    assert all(h == {"content-type": "application/dicom"} for h, _ in whole.parts)
    for cut in range(1, len(raw)):
        assert [c for _, c in parse(raw, [cut]).parts] == expected, cut


def test_a_content_ending_in_cr_needs_crlf() -> None:
    """The CR before a delimiter's LF belongs to the delimiter: with CRLF framing (the RFC's, what every
    client sends) a content's own trailing CR survives; with bare-LF framing it cannot be told apart and is
    dropped (the part then fails the well-formedness check: nothing wrong is stored)."""
    assert [c for _, c in parse(body([b"pixel 13:\r"], nl=b"\r\n")).parts] == [b"pixel 13:\r"]
    assert [c for _, c in parse(body([b"pixel 13:\r"], nl=b"\n")).parts] == [b"pixel 13:"]


def test_byte_by_byte_and_random_chunks() -> None:
    raw = body(CONTENTS, preamble=b"this is the preamble\r\n--not-the-boundary", epilogue=b"\r\nthe epilogue\r\n")
    assert [c for _, c in parse(raw, list(range(1, len(raw)))).parts] == CONTENTS
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(raw)), rng.randint(1, 40)))
        assert [c for _, c in parse(raw, cuts).parts] == CONTENTS


def test_large_content_is_streamed_not_held() -> None:
    """A part of several MB fed in 64 KiB chunks arrives in many data() calls, each no bigger than what
    was fed: the parser keeps only a delimiter-long tail."""
    content = bytes(random.Random(1).getrandbits(8) for _ in range(1 << 16)) * 48  # 3 MiB
    raw = body([content])
    out = Collect()
    p = MultipartParser(B, out)
    largest = 0
    orig = out.data

    def data(chunk: bytes) -> None:
        nonlocal largest
        largest = max(largest, len(chunk))
        orig(chunk)

    out.data = data  # type: ignore[method-assign]
    for i in range(0, len(raw), 65536):
        p.feed(raw[i:i + 65536])
        assert len(p._buf) <= 65536 + len(B) + 4
    p.close()
    assert out.parts[0][1] == content
    assert out.chunks >= 48 and largest <= 65536 + len(B) + 4


def test_mixed_line_ends_padding_folding_and_no_leading_line_end() -> None:
    raw = (b"--" + B.encode() + b"  \t\r\n"  # transport padding after the delimiter
           b"Content-Type: application/dicom;\r\n transfer-syntax=1.2.840.10008.1.2.1\n"  # folded, then LF
           b"X-Extra:  value \r\n\r\nfirst\n"
           b"--" + B.encode() + b"\r\n\r\nsecond (no headers)\r\n"
           b"--" + B.encode() + b"--\r\n")
    out = parse(raw)
    assert out.parts[0] == ({"content-type": "application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
                             "x-extra": "value"}, b"first")
    assert out.parts[1] == ({}, b"second (no headers)")


def test_dicomweb_client_framing() -> None:
    """dicomweb-client starts the body with CRLF before the first delimiter and ends without a CRLF."""
    raw = b"".join(b"\r\n--" + B.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + c for c in (b"a", b"b"))
    raw += b"\r\n--" + B.encode() + b"--"
    assert [c for _, c in parse(raw).parts] == [b"a", b"b"]


@pytest.mark.parametrize(("raw", "message"), [
    (b"", "before the first multipart boundary"),
    (b"no boundary at all\r\n", "before the first multipart boundary"),
    (b"--" + B.encode(), "ends right after the boundary"),
    (b"--" + B.encode() + b"\r\nContent-Type: application/dicom", "inside the headers of part 1"),
    (b"--" + B.encode() + b"\r\nContent-Type: application/dicom\r\n\r\nDICM and then it stops",
     "inside part 1"),
    (body([b"one", b"two"])[:-2], "ends right after the boundary that closes part 2"),
    (body([b"one", b"two"])[:-20], "inside part 2"),
])
def test_truncated_bodies_say_where_they_ended(raw: bytes, message: str) -> None:
    for cuts in ([], list(range(1, len(raw)))):
        with pytest.raises(MultipartError, match=message):
            parse(raw, cuts)


def test_truncated_body_ended_part_count() -> None:
    raw = body([b"one", b"two", b"three"])
    cut = raw.index(b"three") + 2
    out = Collect()
    p = MultipartParser(B, out)
    p.feed(raw[:cut])
    assert [c for _, c in out.parts] == [b"one", b"two"]  # the receiver knows the third never ended
    with pytest.raises(MultipartError, match="inside part 3"):
        p.close()


@pytest.mark.parametrize(("raw", "message"), [
    (b"--" + B.encode() + b"--", "has no part"),
    (b"--" + B.encode() + b"junk\r\n", "followed by b'j'"),
    (b"--" + B.encode() + b"\rX", "bare CR"),
    (b"--" + B.encode() + b"\r\nno colon here\r\n\r\nx\r\n--" + B.encode() + b"--", "without a name and colon"),
    (b"--" + B.encode() + b"\r\nContent-Type: a\r\n\r\nx\r\n--" + B.encode() + b"X\r\n", "followed by b'X'"),
])
def test_malformed_bodies(raw: bytes, message: str) -> None:
    with pytest.raises(MultipartError, match=message):
        parse(raw)


def test_header_block_is_bounded() -> None:
    out = Collect()
    p = MultipartParser(B, out, max_header_bytes=1024)
    p.feed(b"--" + B.encode() + b"\r\n")
    with pytest.raises(MultipartError, match="exceed 1024 bytes"):
        for _ in range(100):
            p.feed(b"X-Pad: " + b"a" * 100 + b"\r\n")


def test_epilogue_and_anything_after_the_close_are_ignored() -> None:
    raw = body([b"x"], epilogue=b"\r\n--" + B.encode() + b"\r\nContent-Type: a\r\n\r\nnot a part")
    assert [c for _, c in parse(raw).parts] == [b"x"]


def test_content_type_parameters_and_boundaries() -> None:
    assert parse_content_type('multipart/related; type="application/dicom"; boundary="a b;c"') == (
        "multipart/related", {"type": "application/dicom", "boundary": "a b;c"})
    assert parse_content_type("Multipart/Related;Boundary=xyz;TYPE=application/dicom") == (
        "multipart/related", {"boundary": "xyz", "type": "application/dicom"})
    assert parse_content_type('a/b; x="q\\"uoted"') == ("a/b", {"x": 'q"uoted'})
    with pytest.raises(MultipartError):
        parse_content_type("multipart/related; boundary")
    assert check_boundary("a" * 70) == b"a" * 70
    for bad in ("", "a" * 71, "trailing space ", "bad\x00char"):
        with pytest.raises(MultipartError, match="invalid multipart boundary"):
            check_boundary(bad)
    # a boundary with spaces and punctuation works end to end
    odd = "gc0p4Jq0M2Yt08j34c0p+/=?"
    assert [c for _, c in parse(body([b"1", b"2"], boundary=odd), boundary=odd).parts] == [b"1", b"2"]
