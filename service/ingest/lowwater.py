"""The spool's low-water mark (``spool.min_free_mb``): refuse C-STORE before the disk is full.

A full disk fails a write half-way (ENOSPC → 0xA700 after the work is done) and starves the ledger,
the logs and the workers' job folders sharing the volume. Under the mark the store handler answers
0xA700 ("out of resources": a PACS keeps the instance and retries) before it reads or writes anything;
C-ECHO still answers, so the node is visibly up but full. It resumes by itself: free space is probed on
every C-STORE (one ``statvfs``, a few microseconds), so the first C-STORE after space returns is stored.
While low, one line a minute says so (no log flood from a PACS retrying every second), and one line
when space is back.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_fusion.service.storage.spool import free_mb

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between two "still low" lines


class LowWaterMark:
    """``refuse()`` is True while the spool has less than ``min_free_mb`` free (0 = never)."""

    def __init__(self, path: Path, min_free_mb: float, *, probe: Callable[[Path], float] = free_mb,
                 clock: Callable[[], float] = time.monotonic, logger: logging.Logger = log) -> None:
        if min_free_mb < 0:
            raise ValueError(f"spool.min_free_mb must be >= 0, got {min_free_mb!r}")
        self.path = Path(path)
        self.min_free_mb = min_free_mb
        self._probe, self._clock, self._log = probe, clock, logger
        self._lock = threading.Lock()
        self._low_since: float | None = None
        self._logged_at = 0.0
        self._refused = 0  # since the last line

    def refuse(self) -> bool:
        """Probe the free space; True (and counted, logged once a minute) when under the mark."""
        if self.min_free_mb <= 0:
            return False
        try:
            free = self._probe(self.path)
        except OSError as exc:  # cannot tell: store, and let the write itself fail if it must
            self._log.error("cannot read free space of the spool %s: %s", self.path, exc.strerror)
            return False
        now = self._clock()
        with self._lock:
            if free >= self.min_free_mb:
                if self._low_since is not None:
                    self._log.warning("spool free space %.0f MB is back above spool.min_free_mb (%.0f MB) after "
                                      "%.0f s: storing again (%d C-STORE refused since the last line)",
                                      free, self.min_free_mb, now - self._low_since, self._refused)
                    self._low_since, self._refused = None, 0
                return False
            self._refused += 1
            if self._low_since is None or now - self._logged_at >= LOG_EVERY:
                if self._low_since is None:
                    self._low_since = now
                self._log.error("spool free space %.0f MB is under spool.min_free_mb (%.0f MB): C-STORE answered "
                                "0xA700 (%d refused since the last line); free space on %s or lower "
                                "spool.min_free_mb", free, self.min_free_mb, self._refused, self.path)
                self._logged_at, self._refused = now, 0
            return True

    @property
    def low(self) -> bool:
        """Whether the last probe was under the mark (for status displays; does not probe)."""
        return self._low_since is not None
