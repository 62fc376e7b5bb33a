"""Alembic migrations of the ledger schema (:mod:`dicom_fusion.service.storage.models`).

Run them with ``dicom-fusion db upgrade``, or in code with :func:`..schema.upgrade`; Alembic is
configured in code there (no ``alembic.ini``), and ``env.py`` only runs on the connection it is given.

Adding a revision: change the models, then write ``versions/NNNN_<what>.py`` from ``script.py.mako``
(``revision = "NNNN"``, ``down_revision`` = the previous one) with explicit ``op.*`` calls; use
``op.batch_alter_table`` for column changes so SQLite can run them. To draft it with autogenerate
against a database at the previous head::

    from alembic import command
    from dicom_fusion.service.storage.schema import alembic_config
    command.revision(alembic_config(url="sqlite:///var/ledger.sqlite"), message="what changed",
                     rev_id="0002", autogenerate=True)

then read and edit the draft. ``tests/unit/test_migrations.py`` fails until the migrations build
exactly ``Base.metadata``.
"""
