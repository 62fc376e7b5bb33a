"""The ledger's SQLAlchemy engine, shared by :class:`~.ledger.Ledger` and the schema migrations.

SQLite (the embedded default) runs in WAL mode with ``synchronous=FULL``, a 30 s busy timeout and
foreign keys on; SQLAlchemy emits BEGIN itself, and connections with the execution option
``ledger_write=True`` (:data:`WRITE`) begin with ``BEGIN IMMEDIATE``. Any other SQLAlchemy URL
(PostgreSQL) is used as it is, its pooled connections pinged before use (they survive a server restart).
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url

WRITE = {"ledger_write": True}  # execution options of a write transaction (BEGIN IMMEDIATE on SQLite)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _wal(cur) -> None:  # type: ignore[no-untyped-def]
    """Switch to WAL. Several processes opening one brand-new file race for this switch, and SQLite may
    answer "database is locked" at once instead of waiting for the busy timeout (seen with 4 threads
    creating one ledger): retry for up to the busy timeout's 30 s."""
    deadline = time.monotonic() + 30.0
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    # SQLAlchemy emits BEGIN itself (`_sqlite_begin`), so that writers can take the lock up front.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    _wal(cur)
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, not just kill -9
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    """Write transactions start with BEGIN IMMEDIATE: the write lock is taken (or waited for, up to
    the busy timeout) before the first read, so a transaction that reads then writes never fails with
    SQLITE_BUSY_SNAPSHOT when another process (a second listener, a worker) committed in between.
    The same holds for DDL: a migration runs in one such transaction, so a concurrent writer waits."""
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ledger_write") else "BEGIN")


def ledger_engine(url: str) -> Engine:
    """An engine for the ledger at ``url``; a SQLite file's folder is created when missing."""
    kwargs: dict[str, object] = {}
    if is_sqlite(url):
        path = make_url(url).database
        if path and path != ":memory:" and not path.startswith("file:"):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # A server restart (or failover) leaves every pooled connection dead: without a ping each one
        # fails one transaction after the database is back (a listener batch answered 0xA700, a stage
        # failed). The ping costs one round trip per checkout.
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)  # type: ignore[arg-type]
    if is_sqlite(url):
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine
