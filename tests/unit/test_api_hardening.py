"""API hardening (issue 18 item 5): /readyz statuses without a token and cached probes, security
headers and a hash-based CSP, the docs pages off by default."""
from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from opshelpers import add_study, complete, run_to_done
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.demo.components import free_port
from dicom_fusion.service.ops.api.main import create_app
from dicom_fusion.service.ops.api.security import InlineBlockError, inline_hashes
from dicom_fusion.service.ops.readiness import CachedReadiness, Check
from dicom_fusion.service.storage.ledger import Ledger

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
#: Referrer-Policy same-origin rather than no-referrer: under no-referrer browsers send `Origin: null` on the
#: sign-in form's POST, which the sign-in's cross-site check refuses (service/ops/api/security.py).
HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "same-origin",
           "cache-control": "no-store"}


class Peers:
    """A FHIR server answering /metadata and a PACS answering C-ECHO, both counting what they get."""

    def __init__(self) -> None:
        self.fhir_requests = 0
        self.echoes = 0
        peers = self

        class Fhir(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                peers.fhir_requests += 1
                body = b'{"resourceType": "CapabilityStatement", "fhirVersion": "4.0.1"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Fhir)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        self.fhir_url = f"http://svc:fhirpw@127.0.0.1:{self.http.server_address[1]}/fhir"

        def on_echo(event: evt.Event) -> int:
            peers.echoes += 1
            return 0x0000

        ae = AE(ae_title="COUNTPACS")
        ae.add_supported_context(Verification)
        self.pacs_port = free_port()
        self.scp = ae.start_server(("127.0.0.1", self.pacs_port), block=False,
                                   evt_handlers=[(evt.EVT_C_ECHO, on_echo)])

    def stop(self) -> None:
        self.http.shutdown()
        self.scp.shutdown()


@pytest.fixture
def peers() -> Iterator[Peers]:
    p = Peers()
    yield p
    p.stop()


def _settings(tmp_path: Path, peers: Peers, **api: object) -> Settings:
    return load_settings(data_dir=tmp_path / "var", api={"token": TOKEN, **api}, fhir={"base_url": peers.fhir_url},
                         pacs={"port": peers.pacs_port, "ae_title": "COUNTPACS"})


def test_readyz_without_a_token_shows_statuses_only(tmp_path: Path, peers: Peers) -> None:
    client = TestClient(create_app(_settings(tmp_path, peers)))
    res = client.get("/readyz")
    assert res.status_code == 200, res.text
    assert res.json() == {"ready": True, "checks": [{"name": n, "ok": True}
                                                    for n in ("ledger", "broker", "spool", "pacs", "fhir")]}
    for secret in (str(tmp_path), "127.0.0.1", "fhirpw", "FHIR 4.0.1", "C-ECHO"):
        assert secret not in res.text
    for wrong in ({"Authorization": "Bearer nope"}, {"Authorization": "Basic x"}):
        assert client.get("/readyz", headers=wrong).json() == res.json()
    detailed = client.get("/readyz", headers=AUTH).json()
    checks = {c["name"]: c for c in detailed["checks"]}
    assert "FHIR 4.0.1" in checks["fhir"]["detail"] and "C-ECHO" in checks["pacs"]["detail"]
    assert "fhirpw" not in str(detailed) and detailed["age_seconds"] >= 0


def test_fifty_readyz_calls_make_one_fhir_request_and_one_echo(tmp_path: Path, peers: Peers) -> None:
    # 3 s: the 50 calls must fit in one cache period even on a loaded machine (1 s did not always)
    client = TestClient(create_app(_settings(tmp_path, peers, readiness_cache_seconds=3)))
    with ThreadPoolExecutor(max_workers=10) as pool:  # concurrent callers share the probe in flight
        codes = list(pool.map(lambda i: client.get("/readyz", headers=AUTH if i % 2 else {}).status_code,
                              range(50)))
    assert codes == [200] * 50
    print(f"\n50 /readyz calls: {peers.fhir_requests} FHIR request(s), {peers.echoes} C-ECHO(s)")
    assert (peers.fhir_requests, peers.echoes) == (1, 1)
    time.sleep(3.1)  # past api.readiness_cache_seconds: the next call probes again, once
    for _ in range(10):
        client.get("/readyz")
    assert (peers.fhir_requests, peers.echoes) == (2, 2)


def test_cached_readiness_probes_once_per_ttl_from_the_probe_start() -> None:
    now = [100.0]
    probes: list[float] = []

    def probe(ledger: object, settings: object) -> list[Check]:
        probes.append(now[0])
        now[0] += 3.0  # a slow probe: its age counts from its start
        return [Check("fhir", True, "ok", 3.0)]

    cache = CachedReadiness(None, None, ttl=5.0, probe=probe, clock=lambda: now[0])  # type: ignore[arg-type]
    first = cache.get()
    assert probes == [100.0] and cache.age(first) == 3.0
    now[0] = 104.9
    assert cache.get() is first and probes == [100.0]
    now[0] = 105.0
    assert cache.get() is not first and probes == [100.0, 105.0]
    with pytest.raises(ValueError, match="positive ttl"):
        CachedReadiness(None, None, ttl=0)  # type: ignore[arg-type]


def _inline_hashes(html: str, tag: str) -> set[str]:
    blocks = re.findall(rf"<{tag}(?:\s[^>]*)?>(.*?)</{tag}>", html, re.DOTALL)
    return {"'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'" for b in blocks}


def _directive(csp: str, name: str) -> set[str]:
    for part in csp.split(";"):
        words = part.split()
        if words and words[0] == name:
            return set(words[1:])
    raise AssertionError(f"no {name} in {csp}")


def test_security_headers_on_every_kind_of_response(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var", api={"token": TOKEN}, pacs={"port": free_port()})
    ledger = Ledger(settings.ledger_url)
    add_study(ledger, "1.7.1")
    run_to_done(ledger, complete(ledger, "1.7.1"))
    client = TestClient(create_app(settings))
    responses = [client.get("/healthz"), client.get("/readyz"), client.get("/api/queues"),
                 client.get("/api/queues", headers=AUTH), client.get("/api/studies", params={"page": 0}, headers=AUTH),
                 client.get("/api/studies/1.7.1", headers=AUTH), client.get("/metrics", headers=AUTH),
                 client.get("/nowhere"), client.get("/dashboard", follow_redirects=False), client.get("/login")]
    assert {r.status_code for r in responses} >= {200, 401, 404, 422, 503}
    for res in responses:
        for name, value in HEADERS.items():
            assert res.headers.get(name) == value, (res.request.url, name, res.headers.get(name))
        csp = res.headers["content-security-policy"]
        assert _directive(csp, "frame-ancestors") == {"'none'"} and "'unsafe-inline'" not in _directive(csp, "script-src")


def test_csp_allows_exactly_the_pages_inline_blocks(tmp_path: Path) -> None:
    """Every inline script and style the rendered pages carry is allowed by its hash (the dashboard works
    under the policy); an injected script would not be."""
    settings = load_settings(data_dir=tmp_path / "var", api={"auth": False}, pacs={"port": free_port()})
    ledger = Ledger(settings.ledger_url)
    add_study(ledger, "1.7.2")
    run_to_done(ledger, complete(ledger, "1.7.2"))
    client = TestClient(create_app(settings))
    pages = [client.get("/dashboard", params={"study": "1.7.2"}), client.get("/login")]
    scripts = set()
    for page in pages:
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert _inline_hashes(page.text, "script") <= _directive(csp, "script-src")
        assert _inline_hashes(page.text, "style") <= _directive(csp, "style-src-elem")
        scripts |= _inline_hashes(page.text, "script")
    assert scripts, "the dashboard renders its script inline: the hash check above must have seen it"
    injected = _inline_hashes("<script>alert(1)</script>", "script")
    assert not injected & _directive(pages[0].headers["content-security-policy"], "script-src")


def test_inline_hashes_refuse_blocks_that_change_per_page(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("console.log('static');\n")
    (tmp_path / "ok.html").write_text('<script>\n{% include "app.js" %}\n</script><script src="/x.js"></script>'
                                      "<style>p{color:red}</style>")
    found = inline_hashes(tmp_path)
    assert found["script"] == sorted(_inline_hashes("<script>\nconsole.log('static');\n</script>", "script"))
    assert found["style"] == sorted(_inline_hashes("<style>p{color:red}</style>", "style"))
    (tmp_path / "bad.html").write_text("<script>var user = {{ user | tojson }};</script>")
    with pytest.raises(InlineBlockError, match="bad.html.*static file"):
        inline_hashes(tmp_path)
    (tmp_path / "bad.html").write_text('<script>{% include "dyn.js" %}</script>')
    (tmp_path / "dyn.js").write_text("var n = {{ n }};")
    with pytest.raises(InlineBlockError, match="dyn.js, which uses template syntax"):
        inline_hashes(tmp_path)


def test_docs_pages_only_with_api_docs(tmp_path: Path) -> None:
    off = TestClient(create_app(load_settings(data_dir=tmp_path / "a", api={"token": TOKEN})))
    assert [off.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 401]
    assert off.get("/openapi.json", headers=AUTH).json()["info"]["title"] == "dicom-fusion"
    on = TestClient(create_app(load_settings(data_dir=tmp_path / "b", api={"token": TOKEN, "docs": True})))
    docs = on.get("/docs")
    assert docs.status_code == 200 and "https://cdn.jsdelivr.net" in _directive(
        docs.headers["content-security-policy"], "script-src")
    assert on.get("/redoc").status_code == 200 and on.get("/openapi.json").status_code == 200
    api = on.get("/api/queues", headers=AUTH)  # the CDN is allowed on the docs pages only
    assert "cdn.jsdelivr.net" not in api.headers["content-security-policy"]
    assert on.get("/api/queues").status_code == 401
