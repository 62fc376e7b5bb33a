"""Reloading the route table while `serve` runs (README "Routing": reload without restart).

`serve` routes through a :class:`LiveRouter`: the router of the route table in force, replaced when
`dicom-fusion routes reload` (or any ``kill -HUP``) signals the process, or when the route file changes
(``routing.file``, else the configuration file holding the ``[[routes]]``; its modification time and
size are checked by the completion loop every :data:`CHECK_SECONDS`; a file is read once it has not
changed for :data:`SETTLE_SECONDS`, so a half-saved file is not taken for the new table). A new table replaces the old one
only when it passes every check of :func:`~.routes.load_routes`; otherwise the old table stays in
force and the error is logged once (until it changes or a table loads again).

The outcome of the last attempt is written to ``<data_dir>/routes-status.json`` (:data:`STATUS_FILE`,
read by `routes reload` and by :func:`read_status` for the dashboard and API): the routes in force,
when they were loaded, and the error of a refused reload. `serve` also records its pid in
``<data_dir>/serve.pid`` (:data:`PID_FILE`) so `routes reload` knows whom to signal.
Neither file holds anything of a patient: route names, model names, paths, times and the error text of
the route table.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_fusion.service.config import CONFIG_ENV, Settings, load_settings
from dicom_fusion.service.errors import ServiceError
from dicom_fusion.service.routing.router import Router
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import JobRoute

log = logging.getLogger(__name__)

STATUS_FILE = "routes-status.json"
PID_FILE = "serve.pid"
CHECK_SECONDS = 2.0  # how often the completion loop looks at the route file's modification time
SETTLE_SECONDS = 1.0  # a file modified less than this long ago may be half written: looked at again later


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _signature(path: Path | None) -> tuple[int, int, int] | None:
    """What tells a changed file: modification time (ns), size, inode; None when absent or unset."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LiveRouter:
    """A route decider (:data:`~dicom_fusion.service.storage.models.RouteStudy`) whose route table can be
    replaced while the process runs. Raises :class:`~.routes.RouteError` at construction when the table
    is invalid (``serve`` refuses to start); after that, an invalid table never replaces a valid one.

    ``config`` is the configuration file the settings came from (None: ``$DICOM_FUSION_CONFIG``, if set).
    With ``routing.file`` set, that file is watched and re-read; otherwise the ``[[routes]]`` of the
    configuration file are (the rest of the configuration still needs a restart). ``status_path`` (serve
    only) receives the outcome of each attempt.
    """

    def __init__(self, settings: Settings, ledger: Ledger, *, config: Path | None = None,
                 status_path: Path | None = None, check_seconds: float = CHECK_SECONDS) -> None:
        self.settings = settings
        self.ledger = ledger
        raw = config if config is not None else os.environ.get(CONFIG_ENV) or None
        self.config = Path(raw).expanduser() if raw else None
        self.watched = settings.routing.file if settings.routing.file is not None else self.config
        self.status_path = status_path
        self.check_seconds = check_seconds
        self.router = Router.from_settings(settings, ledger)
        self._signature = _signature(self.watched)
        self._checked = time.monotonic()
        self._requested = False  # set by the SIGHUP handler: a plain flag, safe in a signal handler
        self._lock = threading.Lock()  # one reload at a time (completion loop, association releases)
        self.loaded_at = _now()
        self.attempts = 0
        self.error: str | None = None
        self.error_at: str | None = None
        self._write_status("start")

    # ---- routing ------------------------------------------------------------------------------
    def __call__(self, study_id: int) -> tuple[JobRoute, ...] | str:
        return self.router(study_id)  # one attribute read: a reload swaps the whole router at once

    @property
    def routes(self) -> list[str]:
        return [r.name for r in self.router.table.routes]

    # ---- reloading ----------------------------------------------------------------------------
    def request(self) -> None:
        """Ask for a reload at the next :meth:`refresh` (what SIGHUP does)."""
        self._requested = True

    def refresh(self) -> bool | None:
        """Reload when asked to, or when the watched file changed (looked at every ``check_seconds``).
        True: a new table is in force; False: it was refused (the old one stays); None: nothing to do."""
        requested = self._requested
        if not requested and time.monotonic() - self._checked < self.check_seconds:
            return None
        self._checked = time.monotonic()
        signature = _signature(self.watched)
        if not requested and signature == self._signature:
            return None
        if not requested and signature is not None and time.time() - signature[0] / 1e9 < SETTLE_SECONDS:
            return None  # still being written (an editor saving in place): at the next check
        self._requested = False
        self._signature = signature
        return self.reload("signal" if requested else f"{self.watched} changed")

    def reload(self, why: str) -> bool:
        """Load the route table again; it replaces the one in force only if valid."""
        with self._lock:
            self.attempts += 1
            try:
                router = Router.from_settings(self._fresh_settings(), self.ledger)
            except ServiceError as exc:  # RouteError, or an invalid configuration file
                message = str(exc)
                if message != self.error:  # logged once, not at every check of an unchanged bad file
                    log.error("route table not reloaded (%s); the %d route(s) loaded at %s stay in force: %s",
                              why, len(self.routes), self.loaded_at, message)
                self.error, self.error_at = message, _now()
                self._write_status(why)
                return False
            self.router = router
            self.loaded_at, self.error, self.error_at = _now(), None, None
            log.info("route table reloaded (%s) from %s: %s", why, router.table.source, ", ".join(self.routes))
            self._write_status(why)
            return True

    def _fresh_settings(self) -> Settings:
        """The settings to build the new table from: the same ones when the routes live in
        ``routing.file`` (re-read by load_routes); else the routing part of the configuration file, read
        again."""
        if self.settings.routing.file is not None or self.config is None:
            return self.settings
        fresh = load_settings(self.config)
        return self.settings.model_copy(update={"routes": fresh.routes, "routing": fresh.routing})

    def _write_status(self, why: str) -> None:
        if self.status_path is None:
            return
        table = self.router.table
        status = {
            "pid": os.getpid(), "source": table.source, "watched": str(self.watched) if self.watched else None,
            "routes": [{"name": r.name, "model": r.model, "continue": r.continues} for r in table.routes],
            "loaded_at": self.loaded_at, "attempts": self.attempts, "last_attempt": why,
            "attempted_at": _now(), "error": self.error, "error_at": self.error_at,
        }
        try:
            _write_atomic(self.status_path, json.dumps(status, indent=1))
        except OSError as exc:  # the status file is for people; routing goes on without it
            log.warning("cannot write %s: %s", self.status_path, exc.strerror)


@dataclass(frozen=True)
class RouteStatus:
    """The running serve's route table, as it last wrote it (:data:`STATUS_FILE`)."""

    pid: int
    source: str
    routes: tuple[str, ...]
    loaded_at: str
    attempts: int
    attempted_at: str
    error: str | None  # the last reload was refused: why (the routes above are still in force)
    error_at: str | None


def read_status(data_dir: Path) -> RouteStatus | None:
    """The route status the running (or last) serve of ``data_dir`` wrote; None when there is none."""
    try:
        raw = json.loads((data_dir / STATUS_FILE).read_text())
        return RouteStatus(pid=int(raw["pid"]), source=str(raw["source"]),
                           routes=tuple(str(r["name"]) for r in raw["routes"]), loaded_at=str(raw["loaded_at"]),
                           attempts=int(raw["attempts"]), attempted_at=str(raw["attempted_at"]),
                           error=raw.get("error"), error_at=raw.get("error_at"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ---- the pid file: how `routes reload` finds serve -------------------------------------------------
def write_pid_file(data_dir: Path) -> Path:
    path = data_dir / PID_FILE
    _write_atomic(path, f"{os.getpid()}\n")
    return path


def remove_pid_file(data_dir: Path) -> None:
    """Remove the pid file if it is still ours (a newer serve may have replaced it)."""
    path = data_dir / PID_FILE
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def running_serve_pid(data_dir: Path) -> int | None:
    """The pid of the `serve` running on ``data_dir``: from its pid file, if that process is alive and
    (where /proc tells) a dicom-fusion serve; None otherwise (not running, or a stale file)."""
    try:
        pid = int((data_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's: the signal will tell
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return pid
        if b"serve" not in args or not any(b"dicom" in a for a in args):
            return None  # the pid was reused by another program
    return pid
