"""Security at the DICOM boundary: TLS with real clients (DCMTK storescu, pynetdicom), plain TCP refused
on a TLS port, calling-AE allow-list, and audit rows for every receive."""
from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, write_instance
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicom_fusion.service.config import ListenerSettings, TLSSettings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import AuditEvent, Instance
from dicom_fusion.service.storage.spool import Spool

pytestmark = pytest.mark.faults


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed server certificate made for this test."""
    openssl = require_tool("openssl")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return key, cert


@pytest.fixture
def tls_listener(tmp_path: Path, certs: tuple[Path, Path]) -> Iterator[tuple[Listener, Ledger]]:
    key, cert = certs
    spool = Spool(tmp_path / "spool")
    spool.ensure()
    ledger = Ledger(f"sqlite:///{tmp_path / 'l.sqlite'}")
    settings = ListenerSettings(host="127.0.0.1", port=free_port(), allowed_calling_aes=["TLSPACS"],
                                tls=TLSSettings(cert_file=cert, key_file=key))
    listener = Listener(settings, spool, ledger)
    listener.start()
    yield listener, ledger
    listener.stop()


def test_tls_with_pynetdicom_and_dcmtk(tls_listener: tuple[Listener, Ledger], certs: tuple[Path, Path],
                                       tmp_path: Path, storescu: str) -> None:
    listener, ledger = tls_listener
    port = listener.settings.port
    _, cert = certs
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="TLSPACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DFUSION", tls_args=(ctx, "localhost"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()

    f = write_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4", sop_uid="1.2.3.4.5")
    res = subprocess.run([storescu, "+tla", "+cf", str(cert), "-aet", "TLSPACS", "-aec", "DFUSION",
                          "127.0.0.1", str(port), str(f)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    with ledger.session() as s:
        assert [i.sop_uid for i in s.query(Instance)] == ["1.2.3.4.5"]
        assert s.query(AuditEvent).filter(AuditEvent.event == "received").count() == 1

    # a plain-TCP client cannot talk to the TLS port
    plain = AE(ae_title="TLSPACS")
    plain.add_requested_context(CTImageStorage)
    assert not plain.associate("127.0.0.1", port, ae_title="DFUSION").is_established
    # an AE outside the allow-list is rejected even over TLS
    intruder = AE(ae_title="INTRUDER")
    intruder.add_requested_context(Verification)
    assert intruder.associate("127.0.0.1", port, ae_title="DFUSION", tls_args=(ctx, "localhost")).is_rejected
