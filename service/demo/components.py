"""Real peer components on loopback, for the demo and the tests: a FHIR R4 server (sekmet-fhir),
a PACS (Orthanc, or a pynetdicom storage SCP when Orthanc is not installed), Redis and PostgreSQL.

Each binds 127.0.0.1 on a free port, lives in its own folder, and is stopped by its PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} not answering after {timeout:.0f}s; see {log}")


def _wait_tcp(port: int, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} not open after {timeout:.0f}s; see {log}")


@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes] | None
    workdir: Path
    log: Path

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    @property
    def ready_port(self) -> int:
        """The TCP port that answers once the component serves (set by each subclass)."""
        raise NotImplementedError(f"{type(self).__name__} has no readiness port")

    def restart(self, timeout: float = 60.0) -> None:
        """Start the same command again on the same ports (outage tests: stop, wait, restart)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        self.stop()
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(self.proc.args, cwd=self.workdir, stdout=fh, stderr=subprocess.STDOUT)
        _wait_tcp(self.ready_port, timeout, self.proc, self.log)


@dataclass
class FhirServer(Component):
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def ready_port(self) -> int:
        return self.port


def sekmet_executable() -> str | None:
    here = Path(sys.executable).parent / "sekmet"
    return str(here) if here.exists() else shutil.which("sekmet")


def start_fhir_server(workdir: Path, port: int | None = None, timeout: float = 60.0) -> FhirServer:
    exe = sekmet_executable()
    if exe is None:
        raise FileNotFoundError("sekmet-fhir is not installed; run: pip install -c constraints.txt 'dicom-fusion[demo]'")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    cfg = workdir / "settings.yaml"
    cfg.write_text(
        f"base_url: http://127.0.0.1:{port}/fhir\nhost: 127.0.0.1\nport: {port}\n"
        f"data_dir: {workdir / 'data'}\nlog_inbound: false\n"
        "simulator: {enabled: false}\nvalidation: {inbound: warn}\n"
    )
    log = workdir / "sekmet.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([exe, "serve", "-c", str(cfg)], cwd=workdir, stdout=fh, stderr=subprocess.STDOUT)
    server = FhirServer("fhir", proc, workdir, log, port=port)
    try:
        _wait_http(f"{server.base_url}/metadata", timeout, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class Pacs(Component):
    ae_title: str = "ORTHANC"
    dicom_port: int = 0
    http_port: int = 0
    host: str = "127.0.0.1"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}" if self.http_port else ""

    @property
    def ready_port(self) -> int:
        return self.dicom_port

    @property
    def is_orthanc(self) -> bool:
        return bool(self.http_port)

    def get_json(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.http_url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def lookup(self, uid: str) -> list[dict[str, str]]:
        """Orthanc's /tools/lookup: which resources (Patient/Study/Series/Instance) carry this UID."""
        req = urllib.request.Request(f"{self.http_url}/tools/lookup", data=uid.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return list(json.loads(r.read()))

    def instance_count(self, sop_uid: str) -> int:
        """How many instances with this SOP Instance UID the PACS holds (0 or 1 for a sane PACS)."""
        return sum(1 for hit in self.lookup(sop_uid) if hit.get("Type") == "Instance")


def orthanc_executable() -> str | None:
    for cand in ("/usr/sbin/Orthanc", shutil.which("Orthanc") or ""):
        if cand and Path(cand).exists():
            return cand
    return None


def start_orthanc(workdir: Path, ae_title: str = "ORTHANC", timeout: float = 60.0) -> Pacs:
    exe = orthanc_executable()
    if exe is None:
        raise FileNotFoundError("Orthanc is not installed; run scripts/install-system-deps.sh")
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    cfg = {
        "Name": "dicom-fusion-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowFind": True,  # completion.mode = "pacs" asks the PACS for its counts (C-FIND)
        "Plugins": [],
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "StableAge": 1,
    }
    (workdir / "orthanc.json").write_text(json.dumps(cfg, indent=2))
    log = workdir / "orthanc.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([exe, str(workdir / "orthanc.json")], cwd=workdir, stdout=fh,
                                stderr=subprocess.STDOUT)
    pacs = Pacs("orthanc", proc, workdir, log, ae_title=ae_title, dicom_port=dicom_port, http_port=http_port)
    try:
        _wait_http(f"{pacs.http_url}/system", timeout, proc, log)
        _wait_tcp(dicom_port, timeout, proc, log)
    except BaseException:
        pacs.stop()
        raise
    return pacs


def start_storage_scp(workdir: Path, ae_title: str = "STORESCP", timeout: float = 30.0) -> Pacs:
    """A pynetdicom storage SCP in a child process, for machines without Orthanc."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "scp.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "dicom_fusion.service.demo.components", "scp", ae_title,
                                 str(port), str(workdir / "received")], stdout=fh, stderr=subprocess.STDOUT)
    pacs = Pacs("storescp", proc, workdir, log, ae_title=ae_title, dicom_port=port)
    try:
        _wait_tcp(port, timeout, proc, log)
    except BaseException:
        pacs.stop()
        raise
    return pacs


def start_pacs(workdir: Path) -> Pacs:
    """Orthanc when installed, else the pynetdicom storage SCP."""
    return start_orthanc(workdir) if orthanc_executable() else start_storage_scp(workdir)


@dataclass
class RedisServer(Component):
    port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def ready_port(self) -> int:
        return self.port


def start_redis(workdir: Path, timeout: float = 30.0) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed; run scripts/install-system-deps.sh")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "redis.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                                 "--save", "", "--appendonly", "yes", "--protected-mode", "yes"],
                                stdout=fh, stderr=subprocess.STDOUT)
    server = RedisServer("redis", proc, workdir, log, port=port)
    try:
        _wait_tcp(port, timeout, proc, log)
    except BaseException:
        server.stop()
        raise
    return server


def postgres_bindir() -> Path | None:
    """The folder of PostgreSQL's server programs (initdb, postgres, pg_isready, createdb): the one of
    `initdb` on PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest version)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                    key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return debian[-1].parent if debian else None


def _postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: None when we are not root (run as ourselves); as root the
    `postgres` OS user the Debian package creates, since initdb and postgres refuse to run as root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise FileNotFoundError("running as root, PostgreSQL needs the `postgres` OS user (Debian package "
                                "postgresql creates it)") from None
    return pw.pw_uid, pw.pw_gid


def _process_children(pid: int) -> list[int]:
    """PIDs of the live children of `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            kids.append(int(stat.parent.name))
    return kids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


@dataclass
class PostgresServer(Component):
    """A private PostgreSQL cluster: the postmaster is our child process (started the way pg_ctl
    starts it, without pg_ctl in between, so its PID is ``proc.pid``); trust authentication on
    127.0.0.1 only; the socket directory is the cluster's own folder."""

    port: int = 0
    data_dir: Path = Path()
    database: str = "dfusion"
    owner: tuple[int, int] | None = None  # (uid, gid) the server runs as; None = this process's user

    @property
    def url(self) -> str:
        """The ledger's SQLAlchemy URL (psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def ready_port(self) -> int:
        return self.port

    def _as_owner(self) -> dict[str, object]:
        return {} if self.owner is None else {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}

    def _spawn(self) -> None:
        bindir = postgres_bindir()
        assert bindir is not None
        cmd = [str(bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.data_dir.parent}",
               "-c", "max_connections=200"]
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(cmd, cwd=self.data_dir.parent, stdout=fh, stderr=subprocess.STDOUT,
                                         **self._as_owner())  # type: ignore[call-overload]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the server accepts connections (`pg_isready`; after a crash that includes its recovery)."""
        bindir = postgres_bindir()
        assert bindir is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}; see {self.log}")
            ok = subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                                check=False).returncode == 0
            if ok:
                return
            time.sleep(0.1)
        raise TimeoutError(f"PostgreSQL on port {self.port} not ready after {timeout:.0f}s; see {self.log}")

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: sessions are cut, the cluster is left clean), SIGKILL after `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """kill -9 of the postmaster and its server processes at once, as when the database host dies;
        the next start runs crash recovery from the WAL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        kids = _process_children(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGKILL)
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10  # a server process still attached to the shared memory blocks a start
        while any(_running(pid) for pid in kids) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, timeout: float = 60.0) -> None:
        self.stop()
        self._spawn()
        self.wait_ready(timeout)

    def start_again(self, timeout: float = 60.0) -> None:
        """Start the stopped or killed cluster again on the same port and data."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("PostgreSQL is still running")
        self._spawn()
        self.wait_ready(timeout)

    def destroy(self) -> None:
        """Stop the server and remove its cluster folder."""
        self.stop()
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start_postgres(workdir: Path, database: str = "dfusion", timeout: float = 60.0) -> PostgresServer:
    """initdb a cluster, start it on a free loopback port and create `database` (empty: the caller
    migrates it with `dicom-fusion db upgrade`). Its log is ``workdir/postgres.log``.

    As root the cluster is owned by and runs as the `postgres` OS user, in a folder of its own under
    the system temporary folder (pytest's folders are private to root); otherwise under `workdir`.
    """
    bindir = postgres_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL is not installed; run scripts/install-system-deps.sh")
    owner = _postgres_user()
    workdir.mkdir(parents=True, exist_ok=True)
    if owner is None:
        root = workdir / "cluster"
        root.mkdir()
    else:
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="dfusion-pg-"))
        os.chown(root, *owner)
    data = root / "data"
    log = workdir / "postgres.log"
    as_owner: dict[str, object] = {} if owner is None else {"user": owner[0], "group": owner[1], "extra_groups": []}
    with log.open("wb") as fh:
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--locale=C", "--no-sync"], cwd=root, stdout=fh, stderr=subprocess.STDOUT, check=True,
                       **as_owner)  # type: ignore[call-overload]
    server = PostgresServer("postgres", None, workdir, log, port=free_port(), data_dir=data, database=database,
                            owner=owner)
    try:
        server._spawn()
        server.wait_ready(timeout)
        with log.open("ab") as fh:
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "postgres",
                            database], stdout=fh, stderr=subprocess.STDOUT, check=True)
    except BaseException:
        server.destroy()
        raise
    return server


def _run_scp(ae_title: str, port: int, out: Path) -> None:
    """Child-process body of :func:`start_storage_scp`: store every instance as received."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # noqa: PLC2701

    out.mkdir(parents=True, exist_ok=True)

    def handle(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        (out / f"{uid}.dcm").write_bytes(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for uid in sorted(_STORAGE_CLASSES.values()):
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, handle)])


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "scp":
        _run_scp(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit("usage: python -m dicom_fusion.service.demo.components scp AE PORT OUTDIR")
