"""Raw DICOM upper-layer PDUs for tests that talk to the listener below pynetdicom."""
from __future__ import annotations

import struct


def association_rq(called: str = "DFUSION", calling: str = "SCANNER") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU (PS3.8 9.3.2) proposing Verification: what a scanner's
    DICOM probe sends first."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body

    app_context = item(0x10, b"1.2.840.10008.3.1.1.1")
    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1")
                   + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.8.498.1"))
    fixed = struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body = fixed + app_context + context + user
    return struct.pack(">BBI", 0x01, 0, len(body)) + body
