"""Route table reload without restart (issue 15, item 2), on a real `dicom-fusion serve` process.

serve runs without a worker: a study's job records the route that took it, which is all this needs. The
route file is edited under the running serve: a valid new table is used for the next study (file change,
then `dicom-fusion routes reload`); an invalid one is refused, logged once, shown in
`<data_dir>/routes-status.json` and by `routes reload` (exit 1), and the old table stays in force.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import stop_process, write_instance
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.routing.reload import PID_FILE, STATUS_FILE
from dicom_fusion.service.server import wait_for_port
from dicom_fusion.service.storage.ledger import Ledger

pytestmark = pytest.mark.integration

BAD_ATTRIBUTE = "Modalty"  # the typo of the invalid table


def _table(name: str, *, attribute: str = "Modality") -> str:
    return f'[[routes]]\nname = "{name}"\nmodel = "default"\n[routes.match]\n{attribute} = "DX"\n'


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    port: int
    data: Path
    log: Path
    env: dict[str, str]
    ledger: Ledger

    def send_study(self, folder: Path) -> str:
        study = generate_uid()
        path = write_instance(folder / f"{study}.dcm", study_uid=study, series_uid=generate_uid(),
                              sop_uid=generate_uid(), rows=16)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="DFUSION")
        assert assoc.is_established
        assert int(assoc.send_c_store(path).Status) == 0
        assoc.release()
        return study

    def route_of(self, study: str, timeout: float = 30.0) -> str:
        """The route of the study's job, once completion created it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.ledger.jobs_for_study(study)
            if jobs:
                assert len(jobs) == 1, [(j.route, j.error) for j in jobs]
                return jobs[0].route or f"ignored: {jobs[0].error}"
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"no job for {study} in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def status(self) -> dict[str, object]:
        return json.loads((self.data / STATUS_FILE).read_text())  # type: ignore[no-any-return]

    def wait_status(self, check, timeout: float = 15.0) -> dict[str, object]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = self.status()
            except (OSError, ValueError):
                status = None
            if status is not None and check(status):
                return status
            time.sleep(0.2)
        raise AssertionError(f"route status never matched: {status}\n{self.log.read_text()[-3000:]}")

    def routes_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "routes", *args], check=False,
                              env=self.env, capture_output=True, text=True, timeout=60)


@contextmanager
def serve(tmp_path: Path, routes: Path) -> Iterator[Serve]:
    port, data = free_port(), tmp_path / "var"
    env = dict(os.environ)
    env.pop("DICOM_FUSION_CONFIG", None)
    env.update({"DICOM_FUSION_DATA_DIR": str(data), "DICOM_FUSION_LISTENER__PORT": str(port),
                "DICOM_FUSION_ROUTING__FILE": str(routes), "DICOM_FUSION_COMPLETION__QUIET_SECONDS": "0.5",
                "DICOM_FUSION_WORKER__EMBEDDED": "false"})
    log = tmp_path / "serve.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "serve"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        # serve opens its port before it installs its SIGHUP handler and then writes its pid file
        deadline = time.monotonic() + 30
        while not (data / PID_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        yield Serve(proc, port, data, log, env, Ledger(f"sqlite:///{data / 'ledger.sqlite'}"))
    finally:
        stop_process(proc)


def test_routes_reload_on_file_change_and_on_request_and_a_bad_table_never_replaces_a_good_one(
        tmp_path: Path) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(_table("first"))
    studies = tmp_path / "studies"
    with serve(tmp_path, routes) as s:
        assert (s.data / PID_FILE).read_text().strip() == str(s.proc.pid)
        assert [r["name"] for r in s.status()["routes"]] == ["first"]  # type: ignore[index, union-attr]
        assert s.route_of(s.send_study(studies)) == "first"

        # the file changes: the completion loop sees it and the new table is used for the next study
        routes.write_text(_table("second"))
        s.wait_status(lambda st: [r["name"] for r in st["routes"]] == ["second"])
        assert s.route_of(s.send_study(studies)) == "second"

        # an invalid table: refused, logged once, shown in the status; the old table stays in force
        routes.write_text(_table("third", attribute=BAD_ATTRIBUTE))
        status = s.wait_status(lambda st: st["error"] is not None)
        assert f"unknown attribute '{BAD_ATTRIBUTE}'" in str(status["error"]) and str(routes) in str(status["error"])
        assert [r["name"] for r in status["routes"]] == ["second"]  # type: ignore[index, union-attr]
        assert s.route_of(s.send_study(studies)) == "second"
        time.sleep(3)  # more checks of the unchanged bad file
        res = s.routes_cli("reload")  # asked again: refused again, the same error is not logged again
        assert res.returncode == 1, res.stdout + res.stderr
        assert "refused" in res.stderr and BAD_ATTRIBUTE in res.stderr and "second" in res.stderr
        assert s.log.read_text().count("route table not reloaded") == 1, s.log.read_text()[-3000:]
        res = s.routes_cli("check")  # the file is invalid; the running serve still routes with "second"
        assert res.returncode == 1 and "routes with 1 route(s)" in res.stdout and "second" in res.stdout
        assert "last reload was refused" in res.stdout and BAD_ATTRIBUTE in res.stdout + res.stderr

        # fixed and reloaded on request
        routes.write_text(_table("fourth"))
        res = s.routes_cli("reload")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "reloaded 1 route(s)" in res.stdout and "fourth" in res.stdout
        assert s.status()["error"] is None
        assert s.route_of(s.send_study(studies)) == "fourth"
        assert s.proc.poll() is None  # SIGHUP reloads, it does not stop serve

    assert s.proc.returncode == 0
    assert not (s.data / PID_FILE).exists()  # removed on exit
    res = s.routes_cli("reload")
    assert res.returncode == 2 and "no running serve" in res.stderr
