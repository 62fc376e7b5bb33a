"""Revisions of the ledger schema (Alembic, :mod:`.migrations`): upgrade, check, and new databases.

Who changes the schema, and when:

- ``dicom-fusion db upgrade`` (:func:`upgrade`) migrates a ledger to this release's head revision. It
  is the explicit step for a shared production database, run once per release before the processes.
- ``serve`` on a SQLite ledger (the embedded default) runs :func:`upgrade` itself at start-up, so one
  command keeps working; ``serve`` on any other URL, ``worker`` and ``api`` call :func:`check_schema`
  at start-up and refuse to run (:class:`SchemaError` naming ``dicom-fusion db upgrade``) unless the
  ledger is at head.
- ``Ledger(url)`` on an *empty* database (none of the ledger's tables) creates this release's tables
  and stamps them at head (:func:`create_if_empty`), the database ``db upgrade`` would make: tests and
  tools that construct a ledger on a new file keep working, and a process started on it afterwards
  finds it up to date. A database that has tables is never changed by ``Ledger(url)``.

A ledger made before migrations existed (its tables, no ``alembic_version``) is recognised as
revision 0001 when its tables and columns are those 0001 creates; :func:`upgrade` stamps it and then
runs the later revisions, keeping every row. Each upgrade runs in one transaction (``BEGIN
IMMEDIATE`` on SQLite): a failed one leaves the ledger as it was.

Alembic is configured in code (:func:`alembic_config`); no ``alembic.ini`` is read. Alembic itself is
imported where it is used: a process that only opens an up-to-date ledger (the listener) never loads it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from dicom_fusion.service.errors import SchemaError
from dicom_fusion.service.storage.engine import WRITE, is_sqlite, ledger_engine
from dicom_fusion.service.storage.models import Base

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic logs a dozen INFO lines per run (plugins, "Context impl", "non-transactional DDL" although
# ours run in one transaction); callers log the outcome (UpgradeResult.describe) instead.
for _name in ("alembic.runtime.plugins", "alembic.runtime.migration"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
FIRST_REVISION = "0001"  # the schema of the release before migrations
UPGRADE_COMMAND = "dicom-fusion db upgrade"
_HOW = (f"run `{UPGRADE_COMMAND} --config <file>` with this process's configuration (the same ledger url, "
        "e.g. DICOM_FUSION_LEDGER__URL)")


def alembic_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """Alembic's configuration: our migrations folder, and the connection to run on (or a URL)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this release's code expects."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "service/storage/migrations/versions holds no revision"
    return head


@cache
def _known_revisions() -> frozenset[str]:
    from alembic.script import ScriptDirectory

    return frozenset(s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions())


def shown_url(url: str) -> str:
    """The URL for messages: password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never echo a URL that may hold a password in an odd place
        return "(a ledger url SQLAlchemy cannot parse)"


def _engine(url: str) -> Engine:
    try:
        return ledger_engine(url)
    except ImportError as exc:
        raise SchemaError(f"cannot open the ledger at {shown_url(url)}: its database driver is not installed "
                          f"({exc}); for PostgreSQL install dicom-fusion's `postgres` extra (psycopg)") from exc
    except SQLAlchemyError as exc:
        raise SchemaError(f"cannot open the ledger at {shown_url(url)}: {exc}") from exc


def _revision(conn: Connection) -> str | None:
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _ledger_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names()) & set(Base.metadata.tables)


@dataclass(frozen=True)
class SchemaStatus:
    """Where a ledger stands: its stamped revision (None: none), whether it has the ledger's tables, and
    the head revision of this release."""

    url: str  # as shown in messages (password hidden)
    current: str | None
    head: str
    has_tables: bool

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def problem(self) -> str | None:
        """What is wrong, and what to do; None when the ledger is at head."""
        where = f"the ledger at {self.url}"
        if self.up_to_date:
            return None
        if self.current is None and not self.has_tables:
            return f"{where} has no tables yet: {_HOW} to create them (schema revision {self.head})"
        if self.current is None:
            then = "" if self.head == FIRST_REVISION else f" and then upgrades it to {self.head}"
            return (f"{where} was created before schema migrations (no revision stamped): {_HOW}; it "
                    f"recognises the tables as revision {FIRST_REVISION} and keeps every row{then}")
        if self.current not in _known_revisions():
            return (f"{where} is at schema revision {self.current}, which this release does not know (it "
                    f"was migrated by a newer dicom-fusion?): run that release; this one needs {self.head}")
        return f"{where} is at schema revision {self.current}, this release needs {self.head}: {_HOW}"


def _missing_sqlite_file(url: str) -> bool:
    if not is_sqlite(url):
        return False
    path = make_url(url).database
    return bool(path) and path != ":memory:" and not path.startswith("file:") and not Path(path).exists()


def schema_status(url: str) -> SchemaStatus:
    """Read the ledger's revision; :class:`SchemaError` when the database cannot be read. A SQLite file
    that does not exist reads as empty, and is not created."""
    if _missing_sqlite_file(url):
        return SchemaStatus(url=shown_url(url), current=None, head=head_revision(), has_tables=False)
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            current, has_tables = _revision(conn), bool(_ledger_tables(conn))
    except SQLAlchemyError as exc:
        raise SchemaError(f"cannot read the ledger at {shown_url(url)}: {exc}") from exc
    finally:
        engine.dispose()
    return SchemaStatus(url=shown_url(url), current=current, head=head_revision(), has_tables=has_tables)


def current_revision(url: str) -> str | None:
    """The revision stamped in the ledger; None for an empty ledger or one made before migrations."""
    return schema_status(url).current


def check_schema(url: str) -> str:
    """The start-up check of the processes that do not migrate (``worker``, ``api``, ``serve`` on a
    shared database): the revision when the ledger is at head, else :class:`SchemaError` saying what
    to run (``dicom-fusion db upgrade``)."""
    status = schema_status(url)
    problem = status.problem()
    if problem is not None:
        raise SchemaError(problem)
    return status.head


@dataclass(frozen=True)
class UpgradeResult:
    before: str | None  # revision before the upgrade (None: empty, or made before migrations)
    after: str
    stamped: bool  # tables from before migrations were stamped as FIRST_REVISION

    def describe(self) -> str:
        if self.stamped:
            tail = "" if self.after == FIRST_REVISION else f", then upgraded to {self.after}"
            return f"recognised the tables made before migrations as revision {FIRST_REVISION}{tail}"
        if self.before == self.after:
            return f"already at revision {self.after} (head)"
        return f"upgraded from {self.before or 'an empty database'} to revision {self.after}"


@cache
def _first_release_columns() -> dict[str, frozenset[str]]:
    """Tables and their columns as revision FIRST_REVISION creates them (run on an in-memory database)."""
    from alembic import command

    engine = create_engine("sqlite://")
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(conn), FIRST_REVISION)
            return _columns(conn, set(inspect(conn).get_table_names()) - {VERSION_TABLE})
    finally:
        engine.dispose()


def _columns(conn: Connection, tables: set[str]) -> dict[str, frozenset[str]]:
    insp = inspect(conn)
    return {t: frozenset(c["name"] for c in insp.get_columns(t)) for t in sorted(tables)}


def _recognise_first_release(conn: Connection, url: str) -> None:
    """Tables without a revision must be exactly FIRST_REVISION's, else :class:`SchemaError`."""
    expected = _first_release_columns()
    found = _columns(conn, set(inspect(conn).get_table_names()) & set(expected))  # others' tables: ignored
    diffs = [f"table {t} missing" for t in expected if t not in found]
    for table, columns in found.items():
        want = expected.get(table, frozenset())
        diffs += [f"column {table}.{c} missing" for c in sorted(want - columns)]
        diffs += [f"column {table}.{c} unexpected" for c in sorted(columns - want)]
    if diffs:
        listed = "; ".join(diffs[:8]) + (f"; {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise SchemaError(f"the ledger at {shown_url(url)} has tables but no schema revision, and they are not "
                          f"those of revision {FIRST_REVISION} ({listed}): it was changed by hand or belongs "
                          "to something else; nothing was changed")


def upgrade(url: str) -> UpgradeResult:
    """Migrate the ledger at ``url`` to head in one transaction: create it when empty, stamp a ledger
    made before migrations (see the module docstring), then run the missing revisions."""
    from alembic import command
    from alembic.util import CommandError

    engine = _engine(url)
    try:
        with engine.connect() as conn, conn.execution_options(**WRITE).begin():
            before = _revision(conn)
            if before is not None and before not in _known_revisions():
                raise SchemaError(SchemaStatus(shown_url(url), before, head_revision(), True).problem() or "")
            stamped = before is None and bool(_ledger_tables(conn))
            if stamped:
                _recognise_first_release(conn, url)
                command.stamp(alembic_config(conn), FIRST_REVISION)
            command.upgrade(alembic_config(conn), "head")
            after = _revision(conn)
    except (SQLAlchemyError, CommandError) as exc:
        raise SchemaError(f"migrating the ledger at {shown_url(url)} failed, nothing was changed: {exc}") from exc
    finally:
        engine.dispose()
    assert after is not None
    return UpgradeResult(before=before, after=after, stamped=stamped)


def _is_empty(conn: Connection) -> bool:
    return not _ledger_tables(conn) and not inspect(conn).has_table(VERSION_TABLE)


def create_if_empty(engine: Engine) -> bool:
    """``Ledger(url)``'s new-database path: on an empty database, create this release's tables and stamp
    them at head (Alembic's recipe for a new database); any other database is left as it is. Returns
    whether it created them. Checked again under the write lock, so two processes opening one new
    SQLite file create it once."""
    with engine.connect() as conn:
        if not _is_empty(conn):
            return False
    from alembic import command

    with engine.connect() as conn, conn.execution_options(**WRITE).begin():
        if not _is_empty(conn):
            return False
        Base.metadata.create_all(conn)
        command.stamp(alembic_config(conn), "head")
    return True
