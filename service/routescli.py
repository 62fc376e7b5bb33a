"""`dicom-fusion routes check|explain`: the rule tester of README "Routing" (typer sub-app).

`check` loads the route table exactly as `serve` does and lists it, so a PACS administrator finds a bad
route before a restart does. `explain` answers "what would happen to this study": for DICOM files on
disk, or for a study already in the ledger, it prints the never-process exclusions, every route's
verdict and why, and every job the table would create (one per matching route, up to the first one
without `continue`). Neither prints patient data.

`reload` has the running `serve` load its route table again (SIGHUP to the pid in
`<data_dir>/serve.pid`) and prints what serve answered in `<data_dir>/routes-status.json`: the routes
now in force, or why the new table was refused (the old one then stays in force).

Exit codes: 0 fine (explain: the study would be processed), 1 the route table is invalid (explain: the
study would be ignored; reload: serve refused it), 2 the configuration is invalid, the study is unknown,
or no serve runs (reload).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_fusion.service.config import Settings, redact_url
from dicom_fusion.service.cliopts import ConfigOpt, settings_or_exit
from dicom_fusion.service.errors import ServiceError

routes_app = typer.Typer(no_args_is_help=True, help="Routing: check the route table, explain a study's route.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)



def _table(settings: Settings):  # type: ignore[no-untyped-def]
    from dicom_fusion.service.routing.routes import load_routes

    try:
        return load_routes(settings)
    except ServiceError as exc:
        err.print(f"[red]invalid routes:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc


def _serve_status(settings: Settings) -> None:
    """What the serve running on these settings' data_dir routes with, and its last refused reload."""
    from dicom_fusion.service.routing.reload import read_status, running_serve_pid

    status = read_status(settings.data_dir)
    if status is None or running_serve_pid(settings.data_dir) != status.pid:
        return
    out.print(f"the running serve (pid {status.pid}) routes with {len(status.routes)} route(s) loaded at "
              f"{status.loaded_at}: {escape(', '.join(status.routes))}")
    if status.error is not None:
        out.print(f"[yellow]its last reload was refused ({status.error_at}):[/yellow] {escape(status.error)}")


@routes_app.command("check")
def check(config: ConfigOpt = None) -> None:
    """Load and validate the route table as `serve` would; list the routes in order."""
    settings = settings_or_exit(config)
    _serve_status(settings)
    table = _table(settings)
    t = Table(title=f"routes from {table.source}")
    for col in ("#", "name", "model", "reads", "series", "then"):
        t.add_column(col)
    for i, r in enumerate(table.routes, 1):
        t.add_row(str(i), r.name, f"{r.model} ({r.card.path})", ", ".join(r.card.input.modalities) or "any",
                  r.series, "continue" if r.continues else "stop")
    out.print(t)
    out.print(f"{len(table.routes)} route(s) valid")


@routes_app.command("explain")
def explain(
    target: Annotated[str, typer.Argument(help="DICOM files or a folder of one study, or a Study Instance "
                                                "UID in the ledger.")],
    calling_ae: Annotated[str, typer.Option("--calling-ae", help="Calling AE title to assume for files.")] = "",
    config: ConfigOpt = None,
) -> None:
    """What would happen to this study: exclusions, each route's verdict, the job it would get."""
    from dicom_fusion.service.routing.headers import headers_from_files, headers_from_ledger
    from dicom_fusion.service.routing.routes import phantom_pattern

    settings = settings_or_exit(config)
    table = _table(settings)
    phantom = phantom_pattern(settings)
    timeout = settings.routing.regex_timeout_ms / 1000.0
    path = Path(target)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        try:
            study = headers_from_files(files, calling_ae=calling_ae, phantom_pattern=phantom, timeout=timeout)
        except ValueError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
    else:
        from sqlalchemy import select

        from dicom_fusion.service.storage.ledger import Ledger
        from dicom_fusion.service.storage.models import Study

        ledger = Ledger(settings.ledger_url)
        try:
            with ledger.session() as s:
                study_id = s.scalar(select(Study.id).where(Study.study_uid == target))
            if study_id is None:
                err.print(f"[red]error:[/red] {escape(target)} is neither a file nor a study in the ledger "
                          f"({escape(redact_url(settings.ledger_url))}; same --config as the service?)")
                raise typer.Exit(2)
            study = headers_from_ledger(ledger, study_id, phantom_pattern=phantom, timeout=timeout)
        finally:
            ledger.close()
    if study is not None:
        t = Table(title=f"study {study.study_uid}: {len(study.series)} series, {study.instances} instance(s)")
        for col in ("series", "modality", "instances", "image type", "description"):
            t.add_column(col)
        for s in study.series:
            t.add_row(str(s.series_number if s.series_number is not None else "?"), s.modality, str(s.instances),
                      "\\".join(s.image_type), s.series_description)
        out.print(t)
        excluded, verdicts = table.explain(study)
        if excluded is not None:
            out.print(f"study excluded: {escape(excluded)}")
        for v in verdicts:
            mark = "[green]match[/green]" if v.matched else "[yellow]no match[/yellow]"
            out.print(f"route {escape(v.route)} ({escape(v.model)}): {mark}"
                      + (f" — {escape(v.why)}" if v.why else f" — series {', '.join(v.series_uids)}"))
    decision = table.decide(study)
    if decision.ignored is not None:
        out.print(f"[bold]→ ignored:[/bold] {escape(decision.ignored)}")
        raise typer.Exit(1)
    for plan in decision.plans:  # one job per matching route (several when routes say `continue`)
        release = f", release {plan.release}" if plan.release else ""
        release += f", priority {plan.priority}" if plan.priority != "normal" else ""
        out.print(f"[bold]→ job on route {escape(plan.route)}[/bold]: model {escape(plan.model)}, "
                  f"{len(plan.series_uids)} series{escape(release)}")
    if len(decision.plans) > 1:
        out.print(f"{len(decision.plans)} jobs, each with its own SR and report")


@routes_app.command("reload")
def reload(
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for serve's answer.")] = 15.0,
    config: ConfigOpt = None,
) -> None:
    """Have the running serve load its route table again (SIGHUP); print the routes in force or the error."""
    from dicom_fusion.service.routing.reload import PID_FILE, read_status, running_serve_pid

    settings = settings_or_exit(config)
    pid = running_serve_pid(settings.data_dir)
    if pid is None:
        err.print(f"[red]error:[/red] no running serve found: {escape(str(settings.data_dir / PID_FILE))} is "
                  "missing or names no serve process (same --config as the service?)")
        raise typer.Exit(2)
    before = read_status(settings.data_dir)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        err.print(f"[red]error:[/red] cannot signal serve (pid {pid}): {escape(exc.strerror or str(exc))}")
        raise typer.Exit(2) from exc
    deadline = time.monotonic() + wait
    while True:
        status = read_status(settings.data_dir)
        if status is not None and status.pid == pid and (before is None or before.pid != pid
                                                         or status.attempts > before.attempts):
            break
        if time.monotonic() > deadline:
            err.print(f"[red]error:[/red] serve (pid {pid}) did not answer within {wait:g} s; see its log")
            raise typer.Exit(2)
        time.sleep(0.2)
    if status.error is not None:
        err.print(f"[red]serve refused the new route table:[/red] {escape(status.error)}")
        err.print(f"the {len(status.routes)} route(s) loaded at {status.loaded_at} stay in force: "
                  f"{escape(', '.join(status.routes))}")
        raise typer.Exit(1)
    out.print(f"serve (pid {pid}) reloaded {len(status.routes)} route(s) from {escape(status.source)}: "
              f"{escape(', '.join(status.routes))}")
