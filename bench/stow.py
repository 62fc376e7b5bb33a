"""STOW-RS vs C-STORE on the same files, same run: instances/s, MB/s and CPU per instance of the receiver.

    .venv/bin/python bench/stow.py [--instances 200] [--rows 512] [--per-request 50,200] [--rounds 1]

C-STORE: DCMTK storescu (TCP_NODELAY, one association) into `dicom-fusion serve --no-worker`, the same as
bench/ingest.py's ``ours``. STOW-RS: one HTTP/1.1 connection (keep-alive) into `dicom-fusion api`, the
files streamed from disk as ``multipart/related; type="application/dicom"`` bodies of ``--per-request``
instances each (Content-Length set; the sender does no DICOM work, like storescu). Both keep the full
durability contract (spool fsync + ledger commit before the answer) on the default settings. Each
variant starts a fresh receiver on an empty data directory; the ratio STOW/C-STORE is printed per
variant. CPU is user+sys of the receiver's processes (the figure least disturbed by a shared machine).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import RssSampler, make_corpus, send, start_ours, stop  # noqa: E402

from dicom_fusion.service.demo.components import free_port  # noqa: E402
from dicom_fusion.service.server import wait_for_port  # noqa: E402

TOKEN = "bench-stow-token"
BOUNDARY = "bench-stow-boundary"


def start_api(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = dict(os.environ, DICOM_FUSION_DATA_DIR=str(work), DICOM_FUSION_API__PORT=str(port),
               DICOM_FUSION_API__TOKEN=TOKEN, DICOM_FUSION_LOG_LEVEL="WARNING")
    env.pop("DICOM_FUSION_CONFIG", None)
    subprocess.run([sys.executable, "-m", "dicom_fusion.service.cli", "db", "upgrade"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.cli", "api"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port("127.0.0.1", port, timeout=60)
    return proc, port


def _frames(files: list[Path]) -> tuple[list[bytes | Path], int]:
    head = f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    pieces: list[bytes | Path] = []
    for f in files:
        pieces += [head, f]
    pieces.append(f"\r\n--{BOUNDARY}--\r\n".encode())
    return pieces, sum(len(p) if isinstance(p, bytes) else p.stat().st_size for p in pieces)


def stow(files: list[Path], port: int, per_request: int) -> float:
    """Seconds to store ``files`` in requests of ``per_request`` instances over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    for i in range(0, len(files), per_request):
        pieces, length = _frames(files[i:i + per_request])
        conn.putrequest("POST", "/dicomweb/studies")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", f'multipart/related; type="application/dicom"; boundary={BOUNDARY}')
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        for piece in pieces:
            conn.send(piece if isinstance(piece, bytes) else piece.read_bytes())
        res = conn.getresponse()
        body = res.read()
        if res.status != 200:
            raise RuntimeError(f"STOW-RS answered {res.status}: {body[:500]!r}")
        stored = len(json.loads(body)["00081199"]["Value"])
        if stored != len(files[i:i + per_request]):
            raise RuntimeError(f"{stored} of {len(files[i:i + per_request])} stored")
    conn.close()
    return time.perf_counter() - t0


def measure(kind: str, files: list[Path], work: Path, per_request: int = 0) -> tuple[float, float]:
    """(seconds, receiver CPU seconds) for one variant on a fresh receiver."""
    proc, port = start_ours(work) if kind == "cstore" else start_api(work)
    sampler = RssSampler(proc.pid)
    sampler.start()
    try:
        cpu0 = sampler.cpu_seconds()
        secs = send(files, port, 1, "DFUSION") if kind == "cstore" else stow(files, port, per_request)
        cpu = sampler.cpu_seconds() - cpu0
    finally:
        sampler.stop()
        stop(proc)
    stored = len(list((work / "spool" / "studies").rglob("*.dcm")))
    if stored != len(files):
        raise RuntimeError(f"{kind}: {stored} files in the spool, {len(files)} sent")
    shutil.rmtree(work, ignore_errors=True)
    return secs, cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--per-request", default="50,200", help="STOW-RS instances per request, e.g. 1,50,200")
    ap.add_argument("--rounds", type=int, default=1, help="repeat each variant; the best time is kept")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stow-") as tmp_name:
        tmp = Path(tmp_name)
        files = make_corpus(tmp / "corpus", args.instances, args.rows)
        mb = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} instances, {mb:.1f} MB ({mb / len(files) * 1024:.0f} KB each); durable on both paths")
        results: dict[str, tuple[float, float]] = {}
        variants = [("C-STORE (storescu, 1 association)", "cstore", 0)] + [
            (f"STOW-RS ({n} per request, 1 connection)", "stow", int(n)) for n in args.per_request.split(",")]
        for label, kind, n in variants:
            best: tuple[float, float] | None = None
            for r in range(args.rounds):
                got = measure(kind, files, tmp / f"{kind}-{n}-{r}", n)
                best = got if best is None or got[0] < best[0] else best
            assert best is not None
            results[label] = best
        base = results[variants[0][0]][0]
        print(f"{'receiver':42} {'inst/s':>8} {'MB/s':>7} {'CPU ms/inst':>12} {'vs C-STORE':>11}")
        for label, (secs, cpu) in results.items():
            print(f"{label:42} {len(files) / secs:8.1f} {mb / secs:7.1f} {cpu / len(files) * 1000:12.2f} "
                  f"{base / secs:10.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
