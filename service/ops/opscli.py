"""Operator commands of ``dicom-fusion``: ``api``, ``status``, ``retry``, ``replay``, ``send``.

Registered on the main Typer app by :func:`register` (service/cli.py). The work is done by the same
functions the REST API uses (:mod:`.monitoring`, :mod:`.operations`), so both always agree.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_fusion.service.cliopts import ConfigOpt, settings_or_exit
from dicom_fusion.service.errors import ServiceError

out = Console()
err = Console(stderr=True, soft_wrap=True)  # error messages never wrap: paths stay whole, whatever the width
StudyArg = Annotated[str, typer.Argument(help="Study Instance UID.")]



def api(config: ConfigOpt = None,
        host: Annotated[Optional[str], typer.Option(help="Bind address (default: api.host).")] = None,
        port: Annotated[Optional[int], typer.Option(help="Port (default: api.port).")] = None) -> None:
    """Serve the REST API, the dashboard (/dashboard) and Prometheus metrics (/metrics)."""
    from dicom_fusion.service.ops.api.main import check_api_settings, run
    from dicom_fusion.service.telemetry import configure_logging

    settings = settings_or_exit(config)
    if host is not None or port is not None:
        updated = settings.api.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v is not None})
        settings = settings.model_copy(update={"api": updated})
    try:
        settings = check_api_settings(settings)
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level)
    try:
        run(settings)
    except ServiceError as exc:  # e.g. the ledger schema is older than this release: says what to run
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def status(config: ConfigOpt = None,
           workers: Annotated[bool, typer.Option(help="Ping workers through the broker (Redis).")] = True) -> None:
    """Queues, job states, recent failures and recent studies, from the ledger and the broker."""
    from dicom_fusion.service.ops import monitoring
    from dicom_fusion.service.ops.broker import workers_online
    from dicom_fusion.service.storage.ledger import Ledger

    settings = settings_or_exit(config)
    ledger = Ledger(settings.ledger_url)
    try:
        ov = monitoring.overview(ledger, settings)
    finally:
        ledger.close()
    names: list[str] | None = None
    if workers and not settings.embedded_broker and ov.queues.broker_error is None:
        from dicom_fusion.service.jobs.queues import make_celery

        try:
            names = workers_online(make_celery(settings), timeout=1.0)
        except ServiceError:
            names = None

    qt = Table(title=f"Queues ({ov.queues.broker} broker)", title_justify="left")
    for col in ("queue", "in broker", "waiting", "in flight", "oldest waiting"):
        qt.add_column(col, justify="left" if col == "queue" else "right")
    for q in ov.queues.queues:
        qt.add_row(q.name, "?" if q.depth is None else str(q.depth), str(q.waiting), str(q.in_flight),
                   _age(q.oldest_waiting_seconds))
    out.print(qt)
    if ov.queues.broker_error:
        out.print(f"[red]broker:[/red] {escape(ov.queues.broker_error)}")
    if names is not None:
        out.print(f"workers online: {', '.join(names) if names else 'none'}")

    st = Table(title="Studies by state", title_justify="left")
    st.add_column("state")
    st.add_column("studies", justify="right")
    for name, n in ov.studies_by_state.items():
        st.add_row(name, str(n), style="dim" if not n else ("red" if name in ("failed", "dead") else None))
    out.print(st)
    lat = ov.latency
    p = (lambda v: "–" if v is None else f"{v:.1f} s")  # noqa: E731
    out.print(f"last hour: {ov.instances_last_hour} instance(s) received, {ov.done_last_hour} report(s) done; "
              f"latency p50 {p(lat.p50)} · p90 {p(lat.p90)} · p99 {p(lat.p99)} (n={lat.count})")

    if ov.failures:
        ft = Table(title="Recent failures", title_justify="left")
        for col in ("study", "v", "state", "stage", "tries", "reason"):
            ft.add_column(col, overflow="fold")
        for f in ov.failures:
            ft.add_row(f.study_uid, str(f.version), f.state, f.stage, str(f.attempts), escape(f.error[:200]))
        out.print(ft)
    else:
        out.print("no failing or dead jobs")
    rt = Table(title="Recent studies", title_justify="left")
    for col in ("study", "state", "instances", "finding", "v"):
        rt.add_column(col, overflow="fold")
    for s in ov.recent[:10]:
        finding = f"{s.finding} {s.probability:.2f}" if s.finding and s.probability is not None else "–"
        rt.add_row(s.study_uid, s.state, str(s.instances), finding, str(s.job_version))
    out.print(rt)


def _act(config: Path | None, action: str, study_uid: str) -> None:
    from dicom_fusion.service.ops import operations
    from dicom_fusion.service.storage.ledger import Ledger

    settings = settings_or_exit(config)
    ledger = Ledger(settings.ledger_url)
    try:
        enqueue = operations.make_enqueue(ledger, settings)
        if action == "retry":
            result = operations.retry_study(ledger, enqueue, study_uid)
        else:
            result = operations.replay_study(ledger, enqueue, study_uid, operations.make_router(ledger, settings))
    except ServiceError as exc:
        err.print(f"[red]{action} refused:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    finally:
        ledger.close()
    out.print(f"{study_uid}: {result.message}")


def retry(study_uid: StudyArg, config: ConfigOpt = None) -> None:
    """Re-enqueue the current stage of the study's failed or dead job."""
    _act(config, "retry", study_uid)


def replay(study_uid: StudyArg, config: ConfigOpt = None) -> None:
    """Run the study again as a new job version from its stored instances (new SR and report)."""
    _act(config, "replay", study_uid)


def send(folder: Annotated[Path, typer.Argument(help="Folder of DICOM files (searched recursively).")],
         host: Annotated[str, typer.Option(help="Host of the C-STORE SCP.")] = "127.0.0.1",
         port: Annotated[int, typer.Option(help="Port of the C-STORE SCP.")] = 11112,
         aec: Annotated[str, typer.Option(help="Called AE title.")] = "DFUSION",
         aet: Annotated[str, typer.Option(help="Our (calling) AE title.")] = "DFUSION-SEND",
         timeout: Annotated[float, typer.Option(help="Seconds per network operation.")] = 30.0) -> None:
    """Send DICOM files with C-STORE (e.g. to the listener, or to a PACS), with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from dicom_fusion.service.ops.sender import find_dicom_files, send_files
    from dicom_fusion.service.outputs.dispatch import DicomNode

    try:
        files, skipped = find_dicom_files(folder)
        node = DicomNode(aec, host, port)
    except (OSError, ValueError, TypeError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    if not files:
        err.print(f"[red]error:[/red] no DICOM files under {folder}")
        raise typer.Exit(2)
    columns = (TextColumn("[bold]C-STORE[/bold] → " + str(node)), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("send", total=len(files))
        try:
            sent = send_files(files, node, calling_ae=aet, timeout=timeout,
                              on_sent=lambda n: progress.advance(task, n))
        except ServiceError as exc:
            progress.stop()
            err.print(f"[red]send failed:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from exc
    note = f" ({skipped} non-DICOM file(s) skipped)" if skipped else ""
    out.print(f"sent {sent} instance(s) to {node}{note}")


def register(app: typer.Typer) -> None:
    for fn in (api, status, retry, replay, send):
        app.command()(fn)
