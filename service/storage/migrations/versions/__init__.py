"""Revisions of the ledger schema, one file each (Alembic skips this ``__init__``)."""
