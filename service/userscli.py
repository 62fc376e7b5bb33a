"""`dicom-fusion users add|list|disable|enable|passwd|token|revoke`: named users of the API and dashboard
(README "Users and roles").

Run on the service's host by whoever administers it (it writes the ledger directly; the audit rows say
`by=console`). Passwords are read from a hidden prompt, or with ``--password-stdin`` from standard input
(for provisioning scripts); they never appear on the command line. An API token is printed once.

Exit codes: 0 done, 1 refused (the message says why), 2 bad configuration.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_fusion.service.cliopts import ConfigOpt, settings_or_exit
from dicom_fusion.service.errors import ServiceError
from dicom_fusion.service.storage.models import Role

users_app = typer.Typer(no_args_is_help=True, help="Named users and API tokens of the API and dashboard.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
BY = "console"

UserArg = Annotated[str, typer.Argument(help="Username (a-z 0-9 . _ -).")]
StdinOpt = Annotated[bool, typer.Option("--password-stdin", help="Read the password from standard input.")]


def _run(config: ConfigOpt, action: Callable[[Any], Any]) -> Any:
    from dicom_fusion.service.storage.ledger import Ledger
    from dicom_fusion.service.storage.users import Users

    settings = settings_or_exit(config)
    ledger = Ledger(settings.ledger_url)
    try:
        return action(Users(ledger))
    except ServiceError as exc:
        err.print(f"[red]refused:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    finally:
        ledger.close()


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\n")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@users_app.command()
def add(username: UserArg,
        role: Annotated[Role, typer.Option(help="viewer, reviewer, operator, admin or sender (STOW-RS only).")],
        name: Annotated[str, typer.Option("--name", help="Display name, as approved SRs and reports carry it.")],
        organization: Annotated[str, typer.Option(help="The user's organisation (verified SRs).")] = "",
        password_stdin: StdinOpt = False, config: ConfigOpt = None) -> None:
    """Add a user."""
    password = _password(password_stdin)
    who = _run(config, lambda u: u.add(username, password=password, role=role, display_name=name,
                                       organization=organization, by=BY))
    out.print(f"user {who.username} added ({who.role})")


@users_app.command("list")
def list_(config: ConfigOpt = None) -> None:
    """Users, their roles and how many API tokens each has."""
    users = _run(config, lambda u: u.list())
    table = Table("username", "name", "organisation", "role", "state", "API tokens")
    for i in users:
        table.add_row(i.username, i.display_name, i.organization, str(i.role),
                      "disabled" if i.disabled else "active", str(i.tokens))
    out.print(table)


@users_app.command()
def disable(username: UserArg, config: ConfigOpt = None) -> None:
    """Disable a user (sign-in refused, every API token revoked)."""
    _run(config, lambda u: u.set_disabled(username, True, by=BY))
    out.print(f"user {username} disabled; its API tokens are revoked")


@users_app.command()
def enable(username: UserArg, config: ConfigOpt = None) -> None:
    """Enable a disabled user again (tokens stay revoked: create new ones)."""
    _run(config, lambda u: u.set_disabled(username, False, by=BY))
    out.print(f"user {username} enabled")


@users_app.command()
def passwd(username: UserArg, password_stdin: StdinOpt = False, config: ConfigOpt = None) -> None:
    """Set a user's password."""
    password = _password(password_stdin)
    _run(config, lambda u: u.set_password(username, password, by=BY))
    out.print(f"password of {username} changed")


@users_app.command()
def token(username: UserArg,
          name: Annotated[str, typer.Option("--name", help="What the token is for.")] = "api",
          config: ConfigOpt = None) -> None:
    """Create an API token for a user; it is printed once (store it now)."""
    token_id, value = _run(config, lambda u: u.create_token(username, name, by=BY))
    err.print(f"API token {token_id} for {username} (shown once; revoke with `dicom-fusion users revoke "
              f"{token_id}`):")
    out.print(value)


@users_app.command()
def revoke(token_id: Annotated[int, typer.Argument(help="Token id, as printed when it was created.")],
           config: ConfigOpt = None) -> None:
    """Revoke an API token."""
    _run(config, lambda u: u.revoke_token(token_id, by=BY))
    out.print(f"API token {token_id} revoked")
