"""Ledger schema migrations (service/storage/schema.py, service/storage/migrations, `dicom-fusion db`).

``tests/fixtures/ledger-rev0.sqlite`` is a ledger written by the release before migrations (tables, no
``alembic_version``; see ``tests/fixtures/make_ledger_rev0.py``): 2 studies, 3 instances, a done job
with two deliveries, a dead job with a dead and a skipped delivery, their audit rows.
"""
from __future__ import annotations

import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine
from typer.testing import CliRunner

from dicom_fusion.service.cli import app
from dicom_fusion.service.config import load_settings
from dicom_fusion.service.errors import SchemaError
from dicom_fusion.service.storage import schema
from dicom_fusion.service.storage.ledger import Ledger
from dicom_fusion.service.storage.models import Base, DeliveryState, JobState

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "ledger-rev0.sqlite"
TABLES = ("studies", "series", "instances", "jobs", "deliveries", "audit")
DONE_STUDY, DEAD_STUDY = "1.2.826.0.1.3680043.10.1.1", "1.2.826.0.1.3680043.10.1.2"


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def rev0(tmp_path: Path) -> Path:
    """A copy of the pre-migration ledger, as ``<data_dir>/ledger.sqlite``."""
    path = tmp_path / "var" / "ledger.sqlite"
    path.parent.mkdir()
    shutil.copyfile(FIXTURE, path)
    return path


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with sqlite3.connect(path) as db:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in TABLES}


#: Columns later revisions add to the first release's tables, with the value old rows get.
# 0002: route, card_path, model, series_uids; 0003: release, awaiting_since, review, reviewer,
# reviewer_organization, review_comment, reviewed_finding, reviewed_at; 0006: priority
ADDED = {"jobs": ("", "", "", "", "auto", None, None, None, None, None, None, None, "normal")}


def _upgraded(rows: dict[str, list[tuple[object, ...]]]) -> dict[str, list[tuple[object, ...]]]:
    """The first release's rows as they read at head: every value kept, added columns at their default."""
    return {t: [(*row, *ADDED.get(t, ())) for row in r] for t, r in rows.items()}


def _has_version_table(path: Path) -> bool:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT 1 FROM sqlite_master WHERE name = 'alembic_version'").fetchone() is not None


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                         Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_stamps_a_ledger_from_before_migrations_and_keeps_every_row(rev0: Path) -> None:
    before = _rows(rev0)
    assert [len(before[t]) for t in TABLES[:5]] == [2, 2, 3, 2, 4] and len(before["audit"]) > 10
    assert schema.current_revision(_url(rev0)) is None

    result = schema.upgrade(_url(rev0))
    assert result.stamped and result.before is None and result.after == schema.head_revision()
    assert "revision 0001" in result.describe()
    assert schema.current_revision(_url(rev0)) == schema.head_revision()
    assert schema.check_schema(_url(rev0)) == schema.head_revision()
    assert _rows(rev0) == _upgraded(before)  # every row, every value
    assert _diff(_url(rev0)) == []

    ledger = Ledger(_url(rev0))  # the ledger API reads the old rows
    try:
        [done], [dead] = ledger.jobs_for_study(DONE_STUDY), ledger.jobs_for_study(DEAD_STUDY)
        assert (done.state, done.finding, done.instance_count) == (JobState.DONE, "lesion", 2)
        assert (dead.state, dead.error) == (JobState.DEAD, "PACS refused the SR")
        assert {d.state for d in ledger.deliveries(done.id)} == {DeliveryState.DELIVERED}
        assert len(ledger.study_files(done.study_id)) == 2
    finally:
        ledger.close()
    again = schema.upgrade(_url(rev0))
    assert not again.stamped and again.before == again.after and "already at" in again.describe()


def test_check_schema_refuses_what_is_not_at_head_and_names_the_command(rev0: Path, tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match="created before schema migrations") as legacy:
        schema.check_schema(_url(rev0))
    missing = tmp_path / "none" / "ledger.sqlite"
    with pytest.raises(SchemaError, match="has no tables yet") as empty:
        schema.check_schema(_url(missing))
    assert not missing.parent.exists()  # checking creates nothing
    for exc in (legacy, empty):
        assert "dicom-fusion db upgrade" in str(exc.value) and "--config" in str(exc.value)
    schema.upgrade(_url(rev0))
    with sqlite3.connect(rev0) as db:
        db.execute("UPDATE alembic_version SET version_num = 'fffe'")
    with pytest.raises(SchemaError, match="revision fffe, which this release does not know"):
        schema.check_schema(_url(rev0))
    with pytest.raises(SchemaError, match="does not know"):
        schema.upgrade(_url(rev0))


def test_upgrade_refuses_foreign_tables_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "odd.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(SchemaError, match=r"not those of revision 0001 \(table audit missing;.* \d+ more\)"):
        schema.upgrade(_url(path))
    assert not _has_version_table(path)


NEXT_REVISION = '''"""A later release: jobs get a note."""
import sqlalchemy as sa
from alembic import op

revision = "{next}"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("note")
'''


def test_a_later_revision_is_required_and_applied_keeping_rows(rev0: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The path of the next release: a ledger at this head is refused as older, and `upgrade` runs the next."""
    head = schema.head_revision()
    nxt = f"{int(head) + 1:04d}"
    schema.upgrade(_url(rev0))  # now at head
    before = _rows(rev0)
    migrations = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, migrations, ignore=shutil.ignore_patterns("__pycache__"))
    (migrations / "versions" / f"{nxt}_job_note.py").write_text(
        NEXT_REVISION.replace("{next}", nxt).replace("{head}", head))
    monkeypatch.setattr(schema, "MIGRATIONS", migrations)
    schema._known_revisions.cache_clear()
    try:
        assert schema.head_revision() == nxt
        with pytest.raises(SchemaError, match=f"is at schema revision {head}, this release needs {nxt}: run "
                                              "`dicom-fusion db upgrade --config"):
            schema.check_schema(_url(rev0))
        result = schema.upgrade(_url(rev0))
        assert (result.before, result.after) == (head, nxt)
        assert schema.check_schema(_url(rev0)) == nxt
        after = _rows(rev0)
        assert after["jobs"] == [(*row, None) for row in before["jobs"]]  # the new column, empty
        assert {t: after[t] for t in TABLES if t != "jobs"} == {t: before[t] for t in TABLES if t != "jobs"}
        older = tmp_path / "older.sqlite"  # from before migrations, straight to the next revision
        shutil.copyfile(FIXTURE, older)
        result = schema.upgrade(_url(older))
        assert result.stamped and result.after == nxt and f"then upgraded to {nxt}" in result.describe()
        assert _rows(older)["jobs"] == after["jobs"]
    finally:
        schema._known_revisions.cache_clear()


def test_a_failed_upgrade_leaves_the_database_as_it_was(tmp_path: Path) -> None:
    """One transaction (BEGIN IMMEDIATE on SQLite): the tables 0001 created before its failing index go too."""
    path = tmp_path / "clash.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE other (ts TEXT)")
        db.execute("CREATE INDEX ix_audit_ts ON other (ts)")  # 0001 creates an index of this name
    with pytest.raises(SchemaError, match="failed, nothing was changed.*ix_audit_ts already exists"):
        schema.upgrade(_url(path))
    with sqlite3.connect(path) as db:
        assert {r[0] for r in db.execute("SELECT name FROM sqlite_master")} == {"other", "ix_audit_ts"}


def test_migrations_build_exactly_the_models(tmp_path: Path) -> None:
    """The explicit op.create_table of 0001 (+ later revisions) = Base.metadata, and Ledger(url) on a new
    database makes the same schema, stamped at head."""
    migrated = tmp_path / "migrated.sqlite"
    result = schema.upgrade(_url(migrated))
    assert (result.before, result.after, result.stamped) == (None, schema.head_revision(), False)
    assert _diff(_url(migrated)) == []
    Ledger(_url(tmp_path / "new.sqlite")).close()
    assert _diff(_url(tmp_path / "new.sqlite")) == []
    assert schema.check_schema(_url(tmp_path / "new.sqlite")) == schema.head_revision()


def test_ledger_creates_a_new_database_once_and_leaves_existing_ones_alone(rev0: Path, tmp_path: Path) -> None:
    Ledger(_url(rev0)).close()
    assert not _has_version_table(rev0)  # opening an old ledger does not migrate it
    new = tmp_path / "shared.sqlite"
    errors: list[BaseException] = []

    def open_ledger() -> None:
        try:
            Ledger(_url(new)).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_ledger) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert schema.check_schema(_url(new)) == schema.head_revision()


def test_worker_and_api_refuse_to_start_on_an_unmigrated_ledger(rev0: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery

    from dicom_fusion.service.ops.api import main as api_main
    from dicom_fusion.service.server import run_worker

    def started(*_a: object, **_k: object) -> None:
        raise AssertionError("the process started on an unmigrated ledger")

    monkeypatch.setattr(Celery, "worker_main", started)
    monkeypatch.setattr("uvicorn.run", started)
    settings = load_settings(data_dir=rev0.parent, api={"token": "t"})
    with pytest.raises(SchemaError, match="dicom-fusion db upgrade"):
        run_worker(settings)
    with pytest.raises(SchemaError, match="dicom-fusion db upgrade"):
        api_main.run(settings)
    assert not _has_version_table(rev0)


def test_serve_migrates_its_embedded_sqlite_ledger(rev0: Path) -> None:
    from dicom_fusion.service.server import serve

    settings = load_settings(data_dir=rev0.parent, listener={"port": 0}, worker={"embedded": False})
    stop = threading.Event()
    stop.set()  # serve starts, then stops at once
    thread = threading.Thread(target=serve, args=(settings,), kwargs={"stop": stop})
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert schema.current_revision(settings.ledger_url) == schema.head_revision()


@pytest.fixture
def cli_env(rev0: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    monkeypatch.delenv("DICOM_FUSION_LEDGER__URL", raising=False)
    monkeypatch.setenv("DICOM_FUSION_DATA_DIR", str(rev0.parent))
    monkeypatch.setenv("COLUMNS", "200")
    return rev0


def test_db_cli_current_and_upgrade(cli_env: Path) -> None:
    runner = CliRunner()
    before = _rows(cli_env)
    res = runner.invoke(app, ["db", "current"])
    assert res.exit_code == 1
    assert res.stdout.strip() == f"none (head: {schema.head_revision()})"
    assert "dicom-fusion db upgrade" in res.stderr
    res = runner.invoke(app, ["db", "upgrade"])
    assert res.exit_code == 0, res.output
    assert "recognised the tables made before migrations as revision 0001" in res.stdout
    res = runner.invoke(app, ["db", "current"])
    assert res.exit_code == 0 and res.stdout.strip() == f"{schema.head_revision()} (head)"
    assert _rows(cli_env) == _upgraded(before)


def test_db_cli_fails_with_a_message(cli_env: Path, tmp_path: Path) -> None:
    with sqlite3.connect(cli_env) as db:
        db.execute("ALTER TABLE jobs ADD COLUMN colour TEXT")
    res = CliRunner().invoke(app, ["db", "upgrade"])
    assert res.exit_code == 1
    assert "column jobs.colour unexpected" in res.stderr and "nothing was changed" in res.stderr
    (tmp_path / "bad.toml").write_text("[ledger]\nurl = 42\n")
    res = CliRunner().invoke(app, ["db", "current", "--config", str(tmp_path / "bad.toml")])
    assert res.exit_code == 2 and "error" in res.stderr
