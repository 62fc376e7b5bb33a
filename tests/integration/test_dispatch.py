"""Delivery to a PACS over DICOM: DCMTK storescp and Orthanc receive the SR; refused, rejected,
timed-out and failed stores become DeliveryError with the right `retryable`."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from conftest import require_tool
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicom_fusion.inference.serve.predict import ClassProbability, InferenceResult
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.errors import DeliveryError
from dicom_fusion.service.outputs import dispatch
from dicom_fusion.service.outputs.dispatch import (
    DicomNode,
    StoreOutcome,
    classify_store_status,
    echo,
    store_to_pacs,
)
from dicom_fusion.service.outputs.identity import derive_sr_uids
from dicom_fusion.service.outputs.sr.build import build_sr, check_sr, sr_to_bytes

CALLING_AE = "DFUSION"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
SNOMED = "http://snomed.info/sct"


def make_result() -> InferenceResult:
    malignant = ClassProbability("malignant", "363346000", SNOMED, "Malignant neoplastic disease", 0.75)
    benign = ClassProbability("benign", "30807003", SNOMED, "Benign", 0.25)
    return InferenceResult("hybridnet", "1.0.0", (benign, malignant), malignant, image_only=True,
                           image_only_reason="FHIR server unavailable")


@pytest.fixture(scope="module")
def sr() -> Dataset:
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)
    series_uid, instance_uid = derive_sr_uids(source.StudyInstanceUID, "hybridnet", "1.0.0")
    return build_sr([source], make_result(), sr_instance_uid=instance_uid, sr_series_uid=series_uid,
                    content_datetime=datetime(2024, 1, 2, 3, 4, 5))


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"storescp exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"storescp did not open port {port}")


@pytest.fixture
def start_storescp(tmp_path: Path) -> Iterator[Callable[..., tuple[DicomNode, Path]]]:
    """Start DCMTK's storescp (by absolute path: the venv's pynetdicom storescp shadows it)."""
    exe = require_tool("/usr/bin/storescp")
    procs: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[DicomNode, Path]:
        port, out = free_port(), tmp_path / f"received-{len(procs)}"
        out.mkdir()
        log = (tmp_path / f"storescp-{len(procs)}.log").open("wb")
        proc = subprocess.Popen([exe, "-aet", "STORESCP", "-od", str(out), *options, str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"))
        procs.append(proc)
        _wait_port(port, proc)
        return DicomNode("STORESCP", "127.0.0.1", port), out

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def pynetdicom_scp() -> Iterator[Callable[..., DicomNode]]:
    """An in-process pynetdicom SCP whose C-STORE handler answers a chosen status."""
    servers = []

    def start(status: int = 0x0000, sop_classes: tuple[str, ...] = (SR_STORAGE,)) -> DicomNode:
        ae = AE(ae_title="TESTSCP")
        for uid in sop_classes:
            ae.add_supported_context(uid)
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, lambda event: status)]))
        return DicomNode("TESTSCP", "127.0.0.1", port)

    yield start
    for server in servers:
        server.shutdown()


@pytest.mark.integration
def test_sr_arrives_at_storescp_and_dsrdump_reads_it(start_storescp, sr, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dsrdump = require_tool("/usr/bin/dsrdump")
    node, out = start_storescp()
    store_to_pacs([sr], node, calling_ae=CALLING_AE, timeout=10)
    (received,) = list(out.iterdir())
    assert received.read_bytes().endswith(sr_to_bytes(sr)[-200:])
    check_sr(pydicom.dcmread(received), make_result())
    dump = subprocess.run([dsrdump, str(received)], capture_output=True, text=True, timeout=60, check=True)
    assert "Imaging Measurement Report" in dump.stdout
    assert '"Malignant neoplastic disease")="0.75"' in dump.stdout.replace(" (1,UCUM", "")
    assert "EHR timeline not used" in dump.stdout

    # the same SR from a file (as written to the job folder), sent again: idempotent for the PACS
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_to_bytes(sr))
    store_to_pacs([path], node, calling_ae=CALLING_AE, timeout=10)
    assert [p.name for p in out.iterdir()] == [received.name]


@pytest.mark.integration
def test_echo(start_storescp) -> None:  # type: ignore[no-untyped-def]
    node, _ = start_storescp()
    assert echo(node, CALLING_AE) is True
    assert echo(DicomNode("STORESCP", "127.0.0.1", free_port()), CALLING_AE, timeout=2) is False


@pytest.mark.integration
def test_connection_refused_is_retryable(sr) -> None:  # type: ignore[no-untyped-def]
    node = DicomNode("PACS", "127.0.0.1", free_port())
    with pytest.raises(DeliveryError, match=r"check pacs\.host and pacs\.port") as info:
        store_to_pacs([sr], node, calling_ae=CALLING_AE, timeout=5)
    assert info.value.retryable is True


@pytest.mark.integration
def test_rejected_association_is_retryable(start_storescp, sr) -> None:  # type: ignore[no-untyped-def]
    """DCMTK closes the connection right after its A-ASSOCIATE-RJ, and pynetdicom sometimes sees the
    close first and reports an abort; either way the delivery is retried."""
    node, _ = start_storescp("--refuse")
    with pytest.raises(DeliveryError, match=r"rejected the association|aborted or timed out") as info:
        store_to_pacs([sr], node, calling_ae=CALLING_AE, timeout=10)
    assert info.value.retryable is True


@pytest.mark.integration
def test_rejected_association_names_ae_titles(sr) -> None:  # type: ignore[no-untyped-def]
    ae = AE(ae_title="TESTSCP")
    ae.require_called_aet = True
    ae.add_supported_context(SR_STORAGE)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    try:
        expected = (r"rejected the association \(Rejected Permanent, .*Called AE title not recognised\): "
                    r"check that pacs\.ae_title .*'WRONG'.* 'DFUSION'")
        with pytest.raises(DeliveryError, match=expected) as info:
            store_to_pacs([sr], DicomNode("WRONG", "127.0.0.1", port), calling_ae=CALLING_AE, timeout=10)
        assert info.value.retryable is True
    finally:
        server.shutdown()


@pytest.mark.integration
def test_silent_peer_times_out_retryable(sr) -> None:  # type: ignore[no-untyped-def]
    """A port that accepts TCP but never answers the A-ASSOCIATE-RQ."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with pytest.raises(DeliveryError, match="aborted or timed out during negotiation") as info:
            store_to_pacs([sr], DicomNode("PACS", "127.0.0.1", listener.getsockname()[1]),
                          calling_ae=CALLING_AE, timeout=1)
        assert info.value.retryable is True
        assert time.monotonic() - started < 10
    finally:
        for conn in accepted:
            conn.close()
        listener.close()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(0xA700, True), (0xA7FF, True), (0x0110, True), (0xA900, False), (0xC000, False), (0xC123, False),
     (0x0122, False)],
)
def test_store_failure_status(pynetdicom_scp, sr, status: int, retryable: bool) -> None:  # type: ignore[no-untyped-def]
    node = pynetdicom_scp(status)
    with pytest.raises(DeliveryError, match=f"status 0x{status:04X}") as info:
        store_to_pacs([sr], node, calling_ae=CALLING_AE, timeout=10)
    assert info.value.retryable is retryable


@pytest.mark.integration
@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007])
def test_store_success_and_warning_statuses(pynetdicom_scp, sr, status: int) -> None:  # type: ignore[no-untyped-def]
    store_to_pacs([sr], pynetdicom_scp(status), calling_ae=CALLING_AE, timeout=10)


@pytest.mark.integration
def test_pacs_without_sr_storage_is_permanent(pynetdicom_scp, sr) -> None:  # type: ignore[no-untyped-def]
    node = pynetdicom_scp(sop_classes=(CTImageStorage,))
    with pytest.raises(DeliveryError, match="accepted none of the proposed SOP classes / transfer syntaxes "
                       r"\(Comprehensive 3D SR Storage in Explicit VR Little Endian or ") as info:
        store_to_pacs([sr], node, calling_ae=CALLING_AE, timeout=10)
    assert info.value.retryable is False


@pytest.mark.integration
def test_compressed_dataset_goes_as_it_is_or_is_refused_for_good(start_storescp, sr) -> None:  # type: ignore[no-untyped-def]
    """Compressed data cannot be converted, so it is proposed only in its own transfer syntax."""
    path = Path(get_testdata_file("MR_small_jp2klossless.dcm"))
    node, out = start_storescp()  # DCMTK default: uncompressed syntaxes only
    with pytest.raises(DeliveryError, match="MR Image Storage in JPEG 2000 Image Compression") as info:
        store_to_pacs([path], node, calling_ae=CALLING_AE, timeout=10)
    assert info.value.retryable is False
    with pytest.raises(DeliveryError, match=r"does not accept dataset 2/2 \(MR Image Storage\) in JPEG 2000") as info:
        store_to_pacs([sr, path], node, calling_ae=CALLING_AE, timeout=10)
    assert info.value.retryable is False
    assert len(list(out.iterdir())) == 1  # the SR before it was stored

    node, out = start_storescp("+xa")  # accept all transfer syntaxes
    store_to_pacs([path], node, calling_ae=CALLING_AE, timeout=10)
    (received,) = list(out.iterdir())
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == pydicom.dcmread(path).file_meta.TransferSyntaxUID


@pytest.mark.integration
def test_in_memory_dataset_without_file_meta(pynetdicom_scp, sr) -> None:  # type: ignore[no-untyped-def]
    bare = Dataset()
    for element in sr:
        bare.add(element)
    store_to_pacs([bare], pynetdicom_scp(), calling_ae=CALLING_AE, timeout=10)
    assert "TransferSyntaxUID" not in getattr(bare, "file_meta", {})  # the caller's dataset is untouched


@pytest.mark.integration
def test_tcp_nodelay_is_set(pynetdicom_scp, sr, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    seen: list[int] = []
    original = dispatch._set_nodelay

    def spy(event: evt.Event) -> None:
        original(event)
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(dispatch, "_set_nodelay", spy)
    store_to_pacs([sr], pynetdicom_scp(), calling_ae=CALLING_AE, timeout=10)
    assert seen and all(seen)


@pytest.mark.integration
def test_sr_stored_in_orthanc(orthanc, sr) -> None:  # type: ignore[no-untyped-def]
    node = DicomNode(orthanc.ae_title, orthanc.host, orthanc.dicom_port)
    assert echo(node, CALLING_AE)
    store_to_pacs([sr], node, calling_ae=CALLING_AE, timeout=30)
    instances = orthanc.get_json("/instances?expand")
    (stored,) = [i for i in instances if i["MainDicomTags"]["SOPInstanceUID"] == sr.SOPInstanceUID]
    tags = orthanc.get_json(f"/instances/{stored['ID']}/simplified-tags")
    assert tags["StudyInstanceUID"] == sr.StudyInstanceUID
    assert tags["PatientID"] == sr.PatientID
    assert tags["Modality"] == "SR"


def test_classify_store_status() -> None:
    assert classify_store_status(0x0000) is StoreOutcome.SUCCESS
    for status in (0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007):
        assert classify_store_status(status) is StoreOutcome.WARNING
    for status in (0xA700, 0xA7FF, 0x0110, 0x0213):
        assert classify_store_status(status) is StoreOutcome.RETRY
    for status in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0117, 0x0122, 0x0124, 0x0211, 0x0212, 0xFE00):
        assert classify_store_status(status) is StoreOutcome.FAIL
    with pytest.raises(ValueError, match="DIMSE status"):
        classify_store_status(0x10000)


def test_dicom_node_validation() -> None:
    with pytest.raises(ValueError, match="1 to 16 printable characters"):
        DicomNode("A" * 17, "127.0.0.1", 104)
    with pytest.raises(ValueError, match=r"must be in 1\.\.65535"):
        DicomNode("PACS", "127.0.0.1", 0)
    with pytest.raises(TypeError, match='"port" must be an int'):
        DicomNode("PACS", "127.0.0.1", "104")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No datasets were provided"):
        store_to_pacs([], DicomNode("PACS", "127.0.0.1", 104), calling_ae=CALLING_AE)
