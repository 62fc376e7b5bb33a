"""Process entry points: ``serve`` (listener + completion + reaper [+ embedded worker]) and ``worker``.

``serve`` never imports torch: the embedded worker is a child process (restarted if it dies), so the
listener keeps acknowledging instances whatever happens to inference.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dicom_fusion.service.config import Settings
from dicom_fusion.service.ingest.listener import Listener
from dicom_fusion.service.jobs.completion import Completion, PacsTimers, PeriodicThread, pacs_query
from dicom_fusion.service.routing.reload import STATUS_FILE, LiveRouter, remove_pid_file, write_pid_file
from dicom_fusion.service.jobs.queues import consume_order, enqueue, make_celery
from dicom_fusion.service.jobs.reaper import reap, release_dead_worker, release_left_by_earlier_workers
from dicom_fusion.service.storage.engine import is_sqlite
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Stage
from dicom_fusion.service.storage.schema import check_schema
from dicom_fusion.service.storage.schema import upgrade as upgrade_schema
from dicom_fusion.service.storage.spool import Spool

log = logging.getLogger("dicom_fusion")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGKILL when the process that started it dies (even by kill -9), so an
    extra listener never outlives `serve` holding the DICOM port, nor the embedded worker polling the
    broker beside a new `serve`'s. The kernel sends it when the *thread* that forked exits: each
    supervisor thread therefore lives until its child is gone (:meth:`_ChildSupervisor.run`)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _ChildSupervisor(threading.Thread):
    """Keeps one child process alive (restarts it after a crash or kill -9).

    ``on_exit(pid)`` runs after the child exited, before it is restarted (the embedded worker's
    leases are released there). The child is started, waited for and terminated in this thread, which
    ends only after the child did: ``PR_SET_PDEATHSIG`` fires when the forking thread exits.
    """

    RESTART_AFTER = 1.0  # seconds between two starts at least: a child that dies at once is not hot-looped

    def __init__(self, name: str, cmd: list[str], stop: threading.Event, *,
                 env: dict[str, str] | None = None, die_with_parent: bool = False,
                 on_exit: Callable[[int], None] | None = None) -> None:
        super().__init__(name=f"{name}-supervisor", daemon=True)
        self.what = name
        self.cmd = cmd
        self.env = env
        self.die_with_parent = die_with_parent
        self.on_exit = on_exit
        self.stop_event = stop
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        if self.die_with_parent and sys.platform.startswith("linux"):
            return subprocess.Popen(self.cmd, env=self.env, preexec_fn=_die_with_parent)  # noqa: PLW1509
        return subprocess.Popen(self.cmd, env=self.env)

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                started = time.monotonic()
                self.proc = self._spawn()
                log.info("%s started (pid %s)", self.what, self.proc.pid)
                while not self.stop_event.is_set():
                    try:
                        self.proc.wait(timeout=0.5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
                if self.stop_event.is_set():
                    break
                log.warning("%s (pid %s) exited with %s; restarting", self.what, self.proc.pid,
                            self.proc.returncode)
                if self.on_exit is not None:
                    try:
                        self.on_exit(self.proc.pid)
                    except Exception as exc:  # the reaper still re-enqueues when the leases run out
                        log.error("%s: clean-up after exit failed: %s: %s", self.what, type(exc).__name__, exc)
                self.restarts += 1
                self.stop_event.wait(max(0.0, self.RESTART_AFTER - (time.monotonic() - started)))
        finally:
            self._stop_child()

    def _stop_child(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def terminate(self) -> None:
        """Stop supervising and end the child (SIGTERM, SIGKILL after 15 s); returns when it is gone."""
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=25)
        else:
            self._stop_child()


def _cli(command: str, config: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "dicom_fusion.service.cli", command]
    return cmd + ["--config", str(config)] if config is not None else cmd


def serve(settings: Settings, *, config: Path | None = None, worker: bool | None = None,
          stop: threading.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set)."""
    # The embedded SQLite ledger is migrated here; a shared database only by `dicom-fusion db upgrade`.
    if is_sqlite(settings.ledger_url):
        log.info("ledger schema: %s", upgrade_schema(settings.ledger_url).describe())
    else:
        check_schema(settings.ledger_url)  # SchemaError: not at head
    stop = stop or threading.Event()
    spool = Spool(settings.spool_dir, fsync=settings.spool.fsync, sync_mode=settings.spool.sync_mode)
    spool.ensure()
    # listener.json, serve.pid and routes-status.json live here; with the spool elsewhere (shared) and a
    # PostgreSQL ledger nothing else creates it
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(settings.ledger_url)
    # RouteError: refuse to start, file/route/field named. Reloaded on SIGHUP (`dicom-fusion routes reload`)
    # and when the route file changes; an invalid new table never replaces this one.
    router = LiveRouter(settings, ledger, config=config, status_path=settings.data_dir / STATUS_FILE)
    app = make_celery(settings)

    def enq(job_id: int, stage: Stage) -> None:
        enqueue(app, ledger, settings, job_id, stage)

    def requeue(job_id: int, stage: Stage) -> bool:  # the reaper's: only a lease still expired (two serves)
        return enqueue(app, ledger, settings, job_id, stage, requeue=True, expired_only=True)

    completion = Completion(ledger, enq, quiet_seconds=settings.completion.quiet_seconds, route=router,
                            refresh=router.refresh, ask_pacs=pacs_query(settings),
                            timers=PacsTimers.of(settings.completion),
                            requery_seconds=settings.completion.requery_seconds)
    extra = settings.listener.processes - 1
    listener = Listener(settings.listener, spool, ledger,
                        reuse_port=extra > 0 or settings.listener.reuse_port,
                        on_release=completion.release if settings.completion.mode == "release" else None,
                        min_free_mb=settings.spool.min_free_mb)
    host, port = listener.start()
    children: list[_ChildSupervisor] = []
    if extra > 0:
        # More listener processes on the same port (SO_REUSEPORT): associations spread over cores.
        env = dict(os.environ, DICOM_FUSION_LISTENER__PORT=str(port))
        if config is not None:  # their route reloads read the same configuration file
            env["DICOM_FUSION_CONFIG"] = str(config)
        for i in range(extra):
            children.append(_ChildSupervisor(f"listener-{i + 2}", _cli("listen", config), stop, env=env,
                                             die_with_parent=True))
            children[-1].start()
    from dicom_fusion.service.telemetry import instrument_listener

    instrument_listener(listener, settings.metrics)
    threads = [
        PeriodicThread("completion", settings.completion.poll_seconds, completion.poll),
        PeriodicThread("reaper", settings.worker.reaper_interval_seconds, lambda: reap(ledger, requeue)),
    ]
    for t in threads:
        t.start()
    if worker if worker is not None else settings.worker.embedded:
        # Dies with serve (PDEATHSIG); when it dies alone, its leases are released at once and its jobs
        # re-enqueued (reaper.release_dead_worker) instead of after worker.lease_seconds.
        children.append(_ChildSupervisor(
            "embedded worker", _cli("worker", config), stop, die_with_parent=True,
            on_exit=lambda pid: release_dead_worker(ledger, requeue, pid)))
        children[-1].start()
    state = {"ae_title": settings.listener.ae_title, "host": host, "port": port, "pid": os.getpid()}
    (settings.data_dir / "listener.json").write_text(json.dumps(state))

    def _reload(_signum: int, _frame: object) -> None:  # SIGHUP: reload the routes here and in listeners
        router.request()
        for child in children:
            if child.what.startswith("listener") and child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGHUP)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, _reload)
    write_pid_file(settings.data_dir)  # `dicom-fusion routes reload` signals this pid; removed on exit
    print(f"dicom-fusion listening: {settings.listener.ae_title}@{host}:{port}", flush=True)

    try:
        _wait_for_stop(stop)
    finally:
        remove_pid_file(settings.data_dir)
        listener.stop()
        for t in threads:
            t.stop()
        completion.close()
        for child in children:
            child.terminate()
        ledger.close()


def listen(settings: Settings, *, stop: threading.Event | None = None) -> None:
    """An extra listener process of ``serve`` (``listener.processes`` > 1): the listener with its own
    group committer on the shared port, completion on release; no quiet-period poll, reaper or worker."""
    stop = stop or threading.Event()
    spool = Spool(settings.spool_dir, fsync=settings.spool.fsync, sync_mode=settings.spool.sync_mode)
    ledger = Ledger(settings.ledger_url)
    on_release = None
    router: LiveRouter | None = None
    if settings.completion.mode == "release":
        app = make_celery(settings)
        router = LiveRouter(settings, ledger)  # reloads like serve's (serve forwards its SIGHUP here)
        completion = Completion(ledger, lambda job_id, stage: enqueue(app, ledger, settings, job_id, stage),
                                quiet_seconds=settings.completion.quiet_seconds, route=router,
                                refresh=router.refresh)
        on_release = completion.release
    if threading.current_thread() is threading.main_thread():  # serve forwards its SIGHUP (route reload)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: router.request() if router is not None else None)
    listener = Listener(settings.listener, spool, ledger, on_release=on_release, reuse_port=True,
                        min_free_mb=settings.spool.min_free_mb)
    listener.start()
    try:
        _wait_for_stop(stop)
    finally:
        listener.stop()
        ledger.close()


def _wait_for_stop(stop: threading.Event) -> None:
    """Block until `stop` is set or SIGTERM/SIGINT arrives; the caller cleans up in its `finally`.
    Signal handlers can only be installed from the main thread (tests run serve in a thread)."""

    def _signal(signum: int, _frame: object) -> None:
        log.info("signal %s: shutting down", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _signal)
        signal.signal(signal.SIGINT, _signal)
    while not stop.wait(0.5):
        pass


def run_worker(settings: Settings, *, queues: list[str] | None = None, concurrency: int | None = None,
               pool: str | None = None) -> None:
    """Start a Celery worker on the given queues (default: settings.worker.queues)."""
    from dicom_fusion.service.jobs import worker

    check_schema(settings.ledger_url)  # SchemaError unless the ledger is at head: `dicom-fusion db upgrade`
    if settings.worker.torch_threads:
        import torch

        torch.set_num_threads(settings.worker.torch_threads)
    app = make_celery(settings)
    runtime = worker.install(settings, app, pool=pool or settings.worker.pool)
    # Leases left on this host by earlier worker processes that no longer run (serve or the container
    # restarted after kill -9): released and re-enqueued now, not after worker.lease_seconds.
    release_left_by_earlier_workers(
        runtime.ledger, lambda job_id, stage: enqueue(app, runtime.ledger, settings, job_id, stage, requeue=True,
                                                      expired_only=True))
    from dicom_fusion.service.telemetry import install_worker_metrics

    install_worker_metrics(settings, pool=pool or settings.worker.pool)
    worker.register_tasks(app, worker.get)
    # every priority of each queue, urgent first, in the order the worker takes them (jobs/queues.py)
    qs = ",".join(consume_order(queues or settings.worker.queues))
    argv = ["worker", "-Q", qs, "-c", str(concurrency or settings.worker.concurrency),
            "-P", pool or settings.worker.pool, "-n", f"dfusion-{os.getpid()}@%h",
            "--without-mingle", "-l", settings.log_level.upper()]
    if settings.embedded_broker:
        # The filesystem transport has no fanout exchange: no gossip, heartbeats or events.
        argv += ["--without-gossip", "--without-heartbeat"]
    else:
        argv += ["-E"]  # task events + heartbeats, so Flower sees workers and tasks
    log.info("worker on queues %s", qs)
    app.worker_main(argv=argv)


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until a TCP port accepts connections (used by the demo and tests)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
