"""A streaming ``multipart/related`` parser (RFC 2046 / RFC 2387) for STOW-RS request bodies.

Push-based: :meth:`MultipartParser.feed` takes the body in chunks of any size, as they come off the socket,
and calls the receiver's ``start(headers)``, ``data(bytes)`` (as many times as the part needs) and
``end()`` for each body part; nothing but a small tail (the length of the delimiter) and one part's header
block is held in memory. :meth:`~MultipartParser.close` says whether the body ended properly (after the
close delimiter); a body that ends anywhere else raises :class:`MultipartError` naming where.

What is accepted (what real clients send):

- a preamble before the first delimiter (or none: the body may start with ``--boundary``), an epilogue after
  the close delimiter (ignored);
- line ends CRLF as the RFC says, or bare LF (some hand-made bodies, some tools); the line end before a
  delimiter belongs to the delimiter, not to the part's content;
- transport padding (spaces / tabs) after a delimiter; header lines folded with leading white space.

What is refused: a delimiter followed by anything but padding and a line end or ``--`` (the boundary
appears inside the content: the sender chose a bad boundary), a header block over ``max_header_bytes``,
a header line without a colon, a body that ends before the close delimiter.
"""
from __future__ import annotations

import re
from typing import Protocol

from dicom_fusion.service.errors import ServiceError

MAX_HEADER_BYTES = 16 * 1024
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{1,70}$")  # RFC 2046 bchars, at most 70
_TOKEN_RE = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)\s*')


class MultipartError(ServiceError):
    """The request body is not a well-formed multipart body (→ HTTP 400, nothing stored)."""


class PartReceiver(Protocol):
    def start(self, headers: dict[str, str]) -> None: ...
    def data(self, chunk: bytes) -> None: ...
    def end(self) -> None: ...


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """``type/subtype; name=value; name="quoted value"`` → (lower-case media type, parameters with
    lower-case names and unquoted values). Raises :class:`MultipartError` on a malformed parameter."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    pos = 0
    rest = rest.strip()
    while pos < len(rest):
        m = _TOKEN_RE.match(rest, pos)
        if m is None:
            raise MultipartError(f"malformed parameter in content type at {rest[pos:pos + 40]!r}")
        raw = m.group(2)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", raw[1:-1]) if raw.startswith('"') else raw
        pos = m.end()
        if pos < len(rest):
            if rest[pos] != ";":
                raise MultipartError(f"malformed parameter in content type at {rest[pos:pos + 40]!r}")
            pos += 1
    return media.strip().lower(), params


def check_boundary(boundary: str) -> bytes:
    if not _BOUNDARY_RE.match(boundary) or boundary.endswith(" "):
        raise MultipartError(f"invalid multipart boundary {boundary[:80]!r} (RFC 2046: 1-70 characters)")
    return boundary.encode("ascii")


_PREAMBLE, _DELIMITER, _HEADERS, _BODY, _DONE = range(5)


class MultipartParser:
    """See the module docstring. ``parts`` counts the parts started so far."""

    def __init__(self, boundary: str, receiver: PartReceiver, *, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
        self._dash_boundary = b"--" + check_boundary(boundary)
        self._needle = b"\n" + self._dash_boundary  # a delimiter: (CR)LF "--" boundary
        self._receiver = receiver
        self._max_header_bytes = max_header_bytes
        # The body may start with the delimiter itself: as if a line end preceded it.
        self._buf = bytearray(b"\n")
        self._state = _PREAMBLE
        self.parts = 0

    @property
    def done(self) -> bool:
        """The close delimiter was seen (what follows is epilogue)."""
        return self._state == _DONE

    def feed(self, chunk: bytes) -> None:
        if self._state == _DONE or not chunk:
            return  # the epilogue is ignored
        self._buf += chunk
        while self._step():
            pass

    def close(self) -> None:
        """The body has ended; raises :class:`MultipartError` unless the close delimiter was seen."""
        if self._state == _DONE:
            return
        if self._state == _PREAMBLE:
            raise MultipartError("the body ends before the first multipart boundary (wrong boundary, or empty body)")
        if self._state == _BODY:
            raise MultipartError(f"the body ends inside part {self.parts} (truncated: no closing boundary after it)")
        if self._state == _HEADERS:
            raise MultipartError(f"the body ends inside the headers of part {self.parts + 1} (truncated)")
        raise MultipartError(f"the body ends right after the boundary that closes part {self.parts} "
                             "(truncated: the closing boundary needs a final '--')")

    # ---- states -------------------------------------------------------------------------------
    def _step(self) -> bool:
        """Advance as far as the buffer allows; True when it should be called again."""
        if self._state == _PREAMBLE:
            i = self._buf.find(self._needle)
            if i < 0:
                # keep what could be the start of a delimiter; drop the rest of the preamble
                del self._buf[:max(0, len(self._buf) - len(self._needle) + 1)]
                return False
            del self._buf[:i + len(self._needle)]
            self._state = _DELIMITER
            return True
        if self._state == _DELIMITER:
            return self._after_delimiter()
        if self._state == _HEADERS:
            return self._headers()
        if self._state == _BODY:
            return self._body()
        return False

    def _after_delimiter(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[:2] == b"--":
            if self.parts == 0:
                raise MultipartError("the multipart body has no part (the first boundary closes it)")
            self._state = _DONE
            self._buf = bytearray()
            return False
        pos = 0
        while pos < len(buf) and buf[pos] in b" \t":
            pos += 1
        if pos >= len(buf):
            if pos > 256:
                raise MultipartError("white space without end after a multipart boundary")
            return False
        if buf[pos] == 0x0A:
            end = pos + 1
        elif buf[pos] == 0x0D:
            if pos + 1 >= len(buf):
                return False
            if buf[pos + 1] != 0x0A:
                raise MultipartError("a multipart boundary is followed by a bare CR")
            end = pos + 2
        else:
            raise MultipartError(f"a multipart boundary is followed by {bytes(buf[pos:pos + 1])!r}, not a line end "
                                 f"(after part {self.parts}: the boundary occurs inside the content?)")
        del buf[:end]
        self._state = _HEADERS
        return True

    def _headers(self) -> bool:
        buf = self._buf
        # an empty header block: the blank line comes first
        if buf[:1] == b"\n" or buf[:2] == b"\r\n":
            block, skip = b"", 1 if buf[:1] == b"\n" else 2
        else:
            m = re.search(rb"\r?\n\r?\n", buf)
            if m is None:
                if len(buf) > self._max_header_bytes:
                    raise MultipartError(f"the headers of part {self.parts + 1} exceed {self._max_header_bytes} bytes")
                return False
            block, skip = bytes(buf[:m.start()]), m.end()
        if skip > self._max_header_bytes or len(block) > self._max_header_bytes:
            raise MultipartError(f"the headers of part {self.parts + 1} exceed {self._max_header_bytes} bytes")
        del buf[:skip]
        headers = self._parse_headers(block)
        self.parts += 1
        self._state = _BODY
        self._receiver.start(headers)
        return True

    def _parse_headers(self, block: bytes) -> dict[str, str]:
        headers: dict[str, str] = {}
        last: str | None = None
        for raw in block.split(b"\n") if block else ():
            line = raw.rstrip(b"\r").decode("latin-1")
            if line[:1] in (" ", "\t") and last is not None:
                headers[last] += " " + line.strip()
                continue
            name, colon, value = line.partition(":")
            if not colon or not name.strip():
                raise MultipartError(f"part {self.parts + 1}: header line without a name and colon")
            last = name.strip().lower()
            headers[last] = value.strip()
        return headers

    def _body(self) -> bool:
        buf = self._buf
        i = buf.find(self._needle)
        if i < 0:
            keep = len(self._needle)  # a delimiter may straddle two chunks (its CR before the LF too)
            if len(buf) > keep:
                out = bytes(buf[:len(buf) - keep])
                del buf[:len(buf) - keep]
                self._receiver.data(out)
            return False
        end = i - 1 if i > 0 and buf[i - 1] == 0x0D else i  # the CR of CRLF belongs to the delimiter
        if end > 0:
            self._receiver.data(bytes(buf[:end]))
        del buf[:i + len(self._needle)]
        self._receiver.end()
        self._state = _DELIMITER
        return True
