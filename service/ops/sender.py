"""Send a folder of DICOM files to a C-STORE SCP (``dicom-fusion send``), in batches over
:func:`dicom_fusion.service.outputs.dispatch.store_to_pacs` so progress can be reported as it goes."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.misc import is_dicom

from dicom_fusion.service.outputs.dispatch import DicomNode, store_to_pacs

BATCH = 32  # files per association: bounded memory, progress every batch


def find_dicom_files(folder: Path) -> tuple[list[Path], int]:
    """DICOM Part 10 files under ``folder`` (recursively, sorted) and how many other files were skipped."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    found, skipped = [], 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if p.name != "DICOMDIR" and is_dicom(p):
            found.append(p)
        else:
            skipped += 1
    return found, skipped


def send_files(files: Sequence[Path], target: DicomNode, *, calling_ae: str, timeout: float = 30.0,
               batch: int = BATCH, on_sent: Callable[[int], None] | None = None) -> int:
    """Store ``files`` on ``target``; ``on_sent(n)`` after each batch. Returns the number sent.

    Raises :class:`~dicom_fusion.service.errors.DeliveryError` at the first batch that fails (earlier
    batches were stored).
    """
    sent = 0
    for start in range(0, len(files), batch):
        chunk = list(files[start:start + batch])
        store_to_pacs(chunk, target, calling_ae=calling_ae, timeout=timeout)
        sent += len(chunk)
        if on_sent is not None:
            on_sent(len(chunk))
    return sent
