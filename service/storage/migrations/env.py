"""Alembic's environment for the ledger: runs the migrations on the connection that
:mod:`dicom_fusion.service.storage.schema` opened (one transaction, ``BEGIN IMMEDIATE`` on SQLite),
or, when only a URL is configured (drafting a revision with autogenerate), on a connection of its own.
"""
from __future__ import annotations

from alembic import context

from dicom_fusion.service.storage.engine import WRITE, ledger_engine
from dicom_fusion.service.storage.models import Base

config = context.config


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=Base.metadata, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("the ledger's migrations run online only: `dicom-fusion db upgrade`")
connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = ledger_engine(config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as conn, conn.execution_options(**WRITE).begin():
            _run(conn)
    finally:
        engine.dispose()
