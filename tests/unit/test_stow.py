"""STOW-RS through the API app (FastAPI's test client) on a real SQLite ledger and spool: what is stored,
what fails with which Failure Reason, the HTTP statuses, the store response (JSON and XML), the size
limit, auth, and that a body which ends early stores nothing."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_instance
from dicomweb_client.web import _load_xml_dataset
from fastapi import HTTPException
from fastapi.testclient import TestClient
from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ingest.stow import PartResult, StowOutcome
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.ops.api.routes.dicomweb import (
    DICOM_JSON,
    DICOM_XML,
    response_dataset,
    response_type,
    to_dicom_json,
    to_dicom_xml,
    warning_header,
)
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Instance, Role, Study
from dicom_fusion.service.storage.users import Users

TOKEN = "stow-service-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BOUNDARY = "stow-test-boundary-42"
CT = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
STUDY = "1.2.826.0.1.3680043.8.498.21"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.22"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def settings_for(tmp_path: Path, **extra: object) -> Settings:
    return load_settings(data_dir=tmp_path / "var", api={"token": TOKEN}, pacs={"port": free_port()}, **extra)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_for(tmp_path)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:  # the context runs the lifespan: the committer stops
        yield c


@pytest.fixture
def instances(tmp_path: Path) -> list[bytes]:
    return [write_instance(tmp_path / "in" / f"{i}.dcm", study_uid=STUDY, series_uid=f"{STUDY}.1",
                           sop_uid=f"{STUDY}.1.{i}", rows=16).read_bytes() for i in range(1, 4)]


def multipart(parts: list[bytes | tuple[str, bytes]], *, close: bool = True) -> bytes:
    out = bytearray()
    for part in parts:
        ctype, data = part if isinstance(part, tuple) else ("application/dicom", part)
        out += f"--{BOUNDARY}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    if close:
        out += f"--{BOUNDARY}--\r\n".encode()
    return bytes(out)


def post(client: TestClient, body: bytes, *, path: str = "/dicomweb/studies", headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return client.post(path, content=body, headers={**AUTH, "Content-Type": CT, **(headers or {})})


def stored_rows(settings: Settings) -> list[tuple[str, str]]:
    ledger = Ledger(settings.ledger_url)
    try:
        with ledger.session() as s:
            return [(i.sop_uid, i.path) for i in s.scalars(select(Instance).order_by(Instance.sop_uid))]
    finally:
        ledger.close()


def spool_files(settings: Settings, folder: str) -> list[Path]:
    root = settings.spool_dir / folder
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def failed(res_json: dict[str, object]) -> list[tuple[str | None, int]]:
    ds = Dataset.from_json(res_json)
    return [(i.get("ReferencedSOPInstanceUID") or None, int(i.FailureReason)) for i in ds.get("FailedSOPSequence", [])]


def referenced(res_json: dict[str, object]) -> list[str]:
    return [str(i.ReferencedSOPInstanceUID) for i in Dataset.from_json(res_json).get("ReferencedSOPSequence", [])]


# ---- storing ----------------------------------------------------------------------------------------
def test_a_study_is_stored_durably_with_the_stow_calling_ae(client: TestClient, settings: Settings,
                                                            instances: list[bytes]) -> None:
    res = post(client, multipart(instances))
    assert res.status_code == 200, res.text
    assert res.headers["content-type"] == DICOM_JSON
    uids = [f"{STUDY}.1.{i}" for i in range(1, 4)]
    assert referenced(res.json()) == uids and failed(res.json()) == []
    ds = Dataset.from_json(res.json())
    assert ds.ReferencedSOPSequence[0].ReferencedSOPClassUID == CT_STORAGE
    rows = stored_rows(settings)
    assert [u for u, _ in rows] == uids
    for (_, path), data in zip(rows, instances, strict=True):
        assert Path(path).read_bytes() == data  # the bytes as sent, at the content-addressed name
    ledger = Ledger(settings.ledger_url)
    with ledger.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.study_uid, study.calling_ae, study.instance_count, study.state) == (STUDY, "STOW", 3, "receiving")
    ledger.close()
    assert spool_files(settings, "incoming") == []  # every temp file was published


def test_a_duplicate_is_a_success_without_a_second_copy(client: TestClient, settings: Settings,
                                                        instances: list[bytes]) -> None:
    assert post(client, multipart(instances[:2])).status_code == 200
    # the same instances again, and one of them twice in the same request
    res = post(client, multipart([instances[0], instances[1], instances[1], instances[2]]))
    assert res.status_code == 200, res.text
    assert len(referenced(res.json())) == 4
    assert len(stored_rows(settings)) == 3
    assert len(spool_files(settings, "studies")) == 3
    assert spool_files(settings, "incoming") == []


def test_per_part_failures_202_and_409(client: TestClient, settings: Settings, instances: list[bytes]) -> None:
    truncated = instances[1][:-100]  # cut inside the pixel data
    other = write_instance(settings.data_dir.parent / "other.dcm", study_uid=OTHER_STUDY,
                           series_uid=f"{OTHER_STUDY}.1", sop_uid=f"{OTHER_STUDY}.1.1", rows=16).read_bytes()
    body = multipart([instances[0], truncated, ("text/plain", b"hello"), other, b""])
    res = post(client, body, path=f"/dicomweb/studies/{STUDY}")
    assert res.status_code == 202, res.text
    assert referenced(res.json()) == [f"{STUDY}.1.1"]
    assert failed(res.json()) == [(None, 0xC000), (None, 0xC000), (f"{OTHER_STUDY}.1.1", 0xA900), (None, 0xC000)]
    warnings = res.headers.get_list("warning")
    assert len(warnings) == 4 and all(w.startswith('299 dicom-fusion "part ') for w in warnings)
    assert "part 2: data set not well-formed" in warnings[0] and "part 3 is text/plain" in warnings[1]
    assert f"not the URL's {STUDY}" in warnings[2] and "part 5 is empty" in warnings[3]
    assert [u for u, _ in stored_rows(settings)] == [f"{STUDY}.1.1"]
    quarantined = [p for p in spool_files(settings, "quarantine") if p.suffix == ".json"]
    reasons = sorted(json.loads(p.read_text())["reason"] for p in quarantined)
    assert len(reasons) == 2 and any("not well-formed" in r for r in reasons) and any("not the URL's" in r for r in reasons)
    assert all(json.loads(p.read_text())["calling_ae"] == "STOW" for p in quarantined)
    # nothing stored at all: 409
    res = post(client, multipart([truncated]))
    assert res.status_code == 409 and referenced(res.json()) == [] and failed(res.json()) == [(None, 0xC000)]
    assert spool_files(settings, "incoming") == []


def test_a_non_storage_sop_class_is_0122(client: TestClient, settings: Settings, tmp_path: Path) -> None:
    from pydicom import dcmread

    path = write_instance(tmp_path / "x.dcm", study_uid=STUDY, series_uid=f"{STUDY}.1", sop_uid=f"{STUDY}.1.9", rows=16)
    ds = dcmread(path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.3.1.2.3.3"  # MPPS: not storage
    ds.save_as(path, enforce_file_format=True)
    res = post(client, multipart([path.read_bytes()]))
    assert res.status_code == 409 and failed(res.json()) == [(f"{STUDY}.1.9", 0x0122)]
    assert stored_rows(settings) == []


def test_a_truncated_body_stores_nothing_and_says_why(client: TestClient, settings: Settings,
                                                     instances: list[bytes]) -> None:
    import os

    whole = multipart(instances)
    cut = whole.index(instances[2]) + len(instances[2]) // 2  # inside the third part, two parts complete
    post(client, multipart(instances[:1], close=False))  # the app and its pools warmed up
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert post(client, whole[:cut]).status_code == 400
    assert len(os.listdir("/proc/self/fd")) <= fds  # no descriptor of a discarded part left open
    res = post(client, whole[:cut])
    assert res.status_code == 400
    assert res.json()["detail"] == "the body ends inside part 3 (truncated: no closing boundary after it): nothing stored"
    # the closing boundary missing only
    res = post(client, multipart(instances, close=False))
    assert res.status_code == 400 and "ends inside part 3" in res.json()["detail"]
    assert stored_rows(settings) == []
    assert spool_files(settings, "studies") == [] and spool_files(settings, "incoming") == []


# ---- the request is refused before anything is read ---------------------------------------------------
def test_content_type_size_and_accept(tmp_path: Path, instances: list[bytes]) -> None:
    s = settings_for(tmp_path, dicomweb={"max_request_mb": 0.02})  # ~20 KB: one 16x16 instance fits, 3 do not
    with TestClient(create_app(s)) as client:
        body = multipart(instances)
        assert post(client, body, headers={"Content-Type": "application/dicom"}).status_code == 415
        assert post(client, body, headers={"Content-Type": f'multipart/related; type="application/dicom+json"; '
                                           f"boundary={BOUNDARY}"}).status_code == 415
        res = post(client, body, headers={"Content-Type": 'multipart/related; type="application/dicom"'})
        assert res.status_code == 400 and "no boundary" in res.json()["detail"]
        big = multipart(instances * 8)
        res = post(client, big)
        assert res.status_code == 413 and "dicomweb.max_request_mb" in res.json()["detail"]
        # no Content-Length (chunked): counted while streaming, nothing stored
        res = client.post("/dicomweb/studies", content=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]),
                          headers={**AUTH, "Content-Type": CT})
        assert res.status_code == 413, res.text
        assert stored_rows(s) == [] and spool_files(s, "incoming") == []
        assert post(client, body[:10], path="/dicomweb/studies/not-a-uid").status_code == 400
        assert post(client, multipart(instances[:1]), headers={"Accept": "text/html"}).status_code == 406
        res = post(client, multipart(instances[:1]), headers={"Accept": "application/dicom+xml"})
        assert res.status_code == 200 and res.headers["content-type"] == DICOM_XML
        ds = _load_xml_dataset(ET.fromstring(res.content))  # dicomweb-client reads our XML
        assert ds.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == f"{STUDY}.1.1"


def test_under_the_low_water_mark_503_retry_after(tmp_path: Path, instances: list[bytes]) -> None:
    s = settings_for(tmp_path, spool={"min_free_mb": 1e12})
    with TestClient(create_app(s)) as client:
        res = post(client, multipart(instances))
        assert res.status_code == 503 and res.headers["retry-after"] == "60"
        assert "spool.min_free_mb" in res.json()["detail"]
        assert stored_rows(s) == []


def test_ledger_down_fails_every_part_0xA700(client: TestClient, settings: Settings, instances: list[bytes],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*_: object, **__: object) -> None:
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    monkeypatch.setattr(Ledger, "record_instances", down)
    res = post(client, multipart(instances))
    assert res.status_code == 409
    assert [code for _, code in failed(res.json())] == [0xA700] * 3
    assert spool_files(settings, "studies") == [] and spool_files(settings, "incoming") == []


def test_a_part_whose_data_cannot_be_synced_is_not_stored(client: TestClient, settings: Settings,
                                                          instances: list[bytes],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    real = os.fdatasync
    calls = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    res = post(client, multipart(instances))
    assert res.status_code == 202, res.text
    assert len(calls) == 3  # file sync mode: every part's data synced before its commit
    assert len(referenced(res.json())) == 2 and [c for _, c in failed(res.json())] == [0xA700]
    assert "disk full" in res.headers["warning"]
    assert len(stored_rows(settings)) == 2 and len(spool_files(settings, "studies")) == 2
    assert spool_files(settings, "incoming") == []


def test_disabled(tmp_path: Path, instances: list[bytes]) -> None:
    with TestClient(create_app(settings_for(tmp_path, dicomweb={"enabled": False}))) as client:
        assert post(client, multipart(instances)).status_code == 404


# ---- who may store ------------------------------------------------------------------------------------
def test_roles(client: TestClient, settings: Settings, instances: list[bytes]) -> None:
    ledger = Ledger(settings.ledger_url)
    users = Users(ledger)
    tokens = {}
    for name, role in (("vera", Role.VIEWER), ("rita", Role.REVIEWER), ("sam", Role.SENDER), ("otto", Role.OPERATOR),
                       ("ada", Role.ADMIN)):
        users.add(name, password="a long enough password", role=role, display_name=name, by="test")
        tokens[name] = users.create_token(name, "stow", by="test")[1]
    ledger.close()
    body = multipart(instances[:1])
    assert client.post("/dicomweb/studies", content=body, headers={"Content-Type": CT}).status_code == 401
    for name, code in (("vera", 403), ("rita", 403), ("sam", 200), ("otto", 200), ("ada", 200)):
        res = client.post(f"/dicomweb/studies/{STUDY}", content=body,
                          headers={"Authorization": f"Bearer {tokens[name]}", "Content-Type": CT})
        assert res.status_code == code, (name, res.text)
    sender = {"Authorization": f"Bearer {tokens['sam']}"}
    assert client.get("/api/queues", headers=sender).status_code == 403  # a sender reads nothing
    assert client.get("/api/studies", headers=sender).status_code == 403
    client.post("/login", data={"username": "sam", "password": "a long enough password"},
                headers={"Origin": "http://testserver"}, follow_redirects=False)
    assert client.get("/dashboard", follow_redirects=False).status_code == 403


# ---- the store response -------------------------------------------------------------------------------
def test_response_building() -> None:
    outcome = StowOutcome([
        PartResult(1, CT_STORAGE, "1.2.3.1", "1.2.3"),
        PartResult(2, failure=0xC000, reason="part 2 is text/plain, not application/dicom"),
        PartResult(3, CT_STORAGE, "1.2.3.3", "1.2.3", duplicate=True),
        PartResult(4, CT_STORAGE, "1.2.4.1", "1.2.4", failure=0xA900, reason="part 4: other study"),
    ])
    assert outcome.http_status == 202
    assert StowOutcome([PartResult(1, CT_STORAGE, "1.2.3.1")]).http_status == 200
    assert StowOutcome([PartResult(1, failure=0xA700)]).http_status == 409
    as_json = json.loads(to_dicom_json(response_dataset(outcome)))
    assert as_json["00081190"] == {"vr": "UR"}  # Retrieve URL: type 2, empty (no WADO-RS here)
    assert [i["00081155"]["Value"] for i in as_json["00081199"]["Value"]] == [["1.2.3.1"], ["1.2.3.3"]]
    assert [i["00081197"] for i in as_json["00081198"]["Value"]] == [{"vr": "US", "Value": [0xC000]},
                                                                     {"vr": "US", "Value": [0xA900]}]
    assert as_json["00081198"]["Value"][0]["00081155"] == {"vr": "UI"}  # unknown for an unreadable part
    root = ET.fromstring(to_dicom_xml(response_dataset(outcome)))
    ns = {"d": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    assert root.tag == "{http://dicom.nema.org/PS3.19/models/NativeDICOM}NativeDicomModel"
    seq = root.find("d:DicomAttribute[@tag='00081198']", ns)
    assert seq is not None and seq.get("vr") == "SQ" and seq.get("keyword") == "FailedSOPSequence"
    items = seq.findall("d:Item", ns)
    assert [i.get("number") for i in items] == ["1", "2"]
    reason = items[1].find("d:DicomAttribute[@tag='00081197']/d:Value", ns)
    assert reason is not None and reason.text == str(0xA900) and reason.get("number") == "1"
    ds = _load_xml_dataset(root)
    assert [int(i.FailureReason) for i in ds.FailedSOPSequence] == [0xC000, 0xA900]
    assert Dataset.from_json(as_json).FailedSOPSequence[1].ReferencedSOPInstanceUID == "1.2.4.1"


def test_accept_and_warning_headers() -> None:
    assert response_type(None) == response_type("*/*") == response_type("application/json") == DICOM_JSON
    assert response_type("application/dicom+xml") == DICOM_XML
    assert response_type("application/dicom+json;q=0.5, application/dicom+xml") == DICOM_XML
    assert response_type("application/dicom+xml;q=0.2, application/dicom+json;q=0.9") == DICOM_JSON
    assert response_type("text/html, application/dicom+xml;q=0.1") == DICOM_XML
    with pytest.raises(HTTPException) as refused:
        response_type("text/html, application/dicom+json;q=0")
    assert refused.value.status_code == 406
    assert warning_header('part 1: "quoted" \\ and \u00e9\nnewline') == '299 dicom-fusion "part 1: ?quoted? ? and ??newline"'
