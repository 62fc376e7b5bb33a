"""`dicom-fusion db upgrade|current`: the ledger's schema revisions (typer sub-app; see storage/schema.py).

Exit codes: 0 done / at head, 1 the ledger is not at head or could not be migrated (the message says
why and what to do), 2 the configuration is invalid.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from dicom_fusion.service.config import Settings, load_settings
from dicom_fusion.service.errors import ServiceError

db_app = typer.Typer(no_args_is_help=True, help="Ledger schema: upgrade (migrate) it, show its revision.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # error messages never wrap: paths stay whole, whatever the width
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file "
                                                   "(default: $DICOM_FUSION_CONFIG).")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ServiceError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc


@db_app.command("upgrade")
def upgrade(config: ConfigOpt = None) -> None:
    """Migrate the ledger to this release's schema, in one transaction.

    An empty database gets the tables; a ledger made before migrations is recognised as revision 0001
    (every row kept) and stamped. Run it once per release against a shared (PostgreSQL) ledger, before
    starting `worker`, `api` and `serve`; `serve` on the embedded SQLite ledger does it by itself.
    """
    from dicom_fusion.service.storage import schema

    settings = _settings(config)
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

    settings = _settings(config)
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
