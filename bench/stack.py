"""What the end-to-end benchmarks share: a work folder (kept with ``--keep``), the loopback peers with the
synthetic cohort's EHR uploaded (sekmet-fhir, Orthanc), and stopping everything they started — `serve`
included — whatever happens, so a failed run leaves no process behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class BenchStack:
    """``with BenchStack(args.keep, "bench-x-") as stack:`` — ``stack.work`` is the folder."""

    def __init__(self, keep: Path | None, prefix: str) -> None:
        self._tmp = None if keep is not None else tempfile.TemporaryDirectory(prefix=prefix)
        self.work = keep.resolve() if keep is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        self.started: list[Any] = []
        self.serve: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self.work.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, component: Any) -> Any:
        """A started peer (anything with ``stop()``), stopped on exit in reverse order."""
        self.started.append(component)
        return component

    def peers(self, cohort: list[Any]) -> tuple[Any, Any]:
        """(FHIR server with every patient's bundle uploaded, Orthanc as the PACS)."""
        from dicom_fusion.fhir.client import FhirClient
        from dicom_fusion.service.demo.components import start_fhir_server, start_orthanc

        fhir = self.add(start_fhir_server(self.work / "fhir"))
        with FhirClient(fhir.base_url) as client:
            for p in cohort:
                client.transaction(json.loads(Path(p.bundle_path).read_text()))
        return fhir, self.add(start_orthanc(self.work / "pacs"))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        serve = self.serve
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGTERM)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(serve.pid, signal.SIGKILL)
        for c in reversed(self.started):
            c.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
