"""`dicom-fusion db upgrade|current`: the ledger's schema revisions (typer sub-app; see storage/schema.py).

Exit codes: 0 done / at head, 1 the ledger is not at head or could not be migrated (the message says
why and what to do), 2 the configuration is invalid.
"""
from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from dicom_fusion.service.cliopts import ConfigOpt, settings_or_exit
from dicom_fusion.service.errors import ServiceError

db_app = typer.Typer(no_args_is_help=True, help="Ledger schema: upgrade (migrate) it, show its revision.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # error messages never wrap: paths stay whole, whatever the width



@db_app.command("upgrade")
def upgrade(config: ConfigOpt = None) -> None:
    """Migrate the ledger to this release's schema, in one transaction.

    An empty database gets the tables; a ledger made before migrations is recognised as revision 0001
    (every row kept) and stamped. Run it once per release against a shared (PostgreSQL) ledger, before
    starting `worker`, `api` and `serve`; `serve` on the embedded SQLite ledger does it by itself.
    """
    from dicom_fusion.service.storage import schema

    settings = settings_or_exit(config)
    try:
        result = schema.upgrade(settings.ledger_url)
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    out.print(f"ledger {escape(schema.shown_url(settings.ledger_url))}: {result.describe()}")


@db_app.command("current")
def current(config: ConfigOpt = None) -> None:
    """Print the ledger's schema revision and this release's; exit 1 when they differ."""
    from dicom_fusion.service.storage import schema

    settings = settings_or_exit(config)
    try:
        status = schema.schema_status(settings.ledger_url)
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    problem = status.problem()
    if problem is None:
        out.print(f"{status.current} (head)")
        return
    out.print(f"{status.current or 'none'} (head: {status.head})")
    err.print(f"[red]error:[/red] {escape(problem)}")
    raise typer.Exit(1)
