"""The listener's hot path into the ledger: one transaction records a whole batch of instances.

:meth:`Ledger.record_instances <.ledger.Ledger.record_instances>` runs :func:`record_batch` with one of
two writers that issue the same statements:

* :class:`CoreWriter` — SQLAlchemy Core on a connection (any database: PostgreSQL in production);
* :class:`SqliteWriter` — the sqlite3 driver connection directly, for the embedded SQLite ledger.
  SQLAlchemy's per-statement overhead (~0.4 ms of CPU each, ~3.5 ms per batch) was a quarter of the
  listener's CPU per instance with one association; the driver does the same batch in ~0.4 ms.
  Values are converted with SQLAlchemy's own bind processors, so rows read back identically.

A unit test runs both writers on the same input and compares the rows.
"""
from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import DateTime, insert, select, update
from sqlalchemy.engine import Connection, Dialect

from dicom_fusion.service.storage.models import (
    AuditEvent,
    Instance,
    InstanceRecord,
    RecordOutcome,
    Series,
    Study,
    StudyState,
)

BeforeWrite = Callable[[list[int]], None]

_TI, _TST, _TSE, _TA = Instance.__table__, Study.__table__, Series.__table__, AuditEvent.__table__


class Writer(Protocol):
    def existing(self, sop_uids: list[str]) -> set[str]: ...
    def studies(self, uids: list[str]) -> dict[str, tuple[int, str]]: ...
    def insert_study(self, row: dict[str, Any]) -> int: ...
    def bump_study(self, study_id: int, n: int, now: datetime) -> None: ...
    def series(self, uids: list[str]) -> dict[str, int]: ...
    def insert_series(self, row: dict[str, Any]) -> int: ...
    def bump_series(self, series_id: int, n: int) -> None: ...
    def insert_instances(self, rows: list[dict[str, Any]]) -> list[int]: ...
    def insert_audits(self, rows: list[dict[str, Any]]) -> None: ...


def _audit(ts: datetime, entity: str, entity_id: int, event_name: str, detail: str) -> dict[str, Any]:
    return {"ts": ts, "entity": entity, "entity_id": entity_id, "event": event_name, "detail": detail[:2000]}


def record_batch(w: Writer, records: Sequence[InstanceRecord], now: datetime,
                 before_write: BeforeWrite | None) -> list[RecordOutcome]:
    """Duplicates check, then ``before_write(new indexes)``, then studies, series, instances, audit."""
    seen = w.existing([r.sop_uid for r in records])
    outcomes: list[RecordOutcome] = []
    fresh: list[InstanceRecord] = []
    fresh_idx: list[int] = []
    for i, r in enumerate(records):
        outcomes.append(RecordOutcome(new=r.sop_uid not in seen, study_uid=r.study_uid))
        if r.sop_uid not in seen:
            seen.add(r.sop_uid)
            fresh.append(r)
            fresh_idx.append(i)
    if not fresh:
        return outcomes
    if before_write is not None:
        before_write(fresh_idx)
    audits: list[dict[str, Any]] = []
    per_study: dict[str, list[InstanceRecord]] = {}
    per_series: dict[str, list[InstanceRecord]] = {}
    for r in fresh:
        per_study.setdefault(r.study_uid, []).append(r)
        per_series.setdefault(r.series_uid, []).append(r)
    known = w.studies(list(per_study))
    study_ids: dict[str, int] = {}
    for uid, group in per_study.items():
        if uid not in known:
            sid = w.insert_study({"study_uid": uid, "state": str(StudyState.RECEIVING), "instance_count": len(group),
                                  "job_version": 0, "first_received_at": now, "last_received_at": now,
                                  "calling_ae": group[0].calling_ae})
            audits.append(_audit(now, "study", sid, "first_instance", f"calling_ae={group[0].calling_ae}"))
        else:
            sid, state = known[uid]
            if state != StudyState.RECEIVING:
                audits.append(_audit(now, "study", sid, "reopened", "late instance after completion"))
            w.bump_study(sid, len(group), now)
        study_ids[uid] = sid
    series_ids = w.series(list(per_series))
    for uid, group in per_series.items():
        if uid not in series_ids:
            series_ids[uid] = w.insert_series({"study_id": study_ids[group[0].study_uid], "series_uid": uid,
                                               "modality": group[0].modality, "instance_count": len(group)})
        else:
            w.bump_series(series_ids[uid], len(group))
    inserted = w.insert_instances([
        {"study_id": study_ids[r.study_uid], "series_id": series_ids[r.series_uid], "sop_uid": r.sop_uid,
         "sop_class_uid": r.sop_class_uid, "transfer_syntax": r.transfer_syntax, "path": str(r.path),
         "sha256": r.sha256, "size": r.size, "received_at": now} for r in fresh])
    for r, inst_id in zip(fresh, inserted, strict=True):
        audits.append(_audit(now, "instance", inst_id, "received", f"calling_ae={r.calling_ae} size={r.size}"))
    w.insert_audits(audits)
    return outcomes


class CoreWriter:
    """The statements as SQLAlchemy Core, on a connection inside a transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def existing(self, sop_uids: list[str]) -> set[str]:
        return set(self.conn.execute(select(_TI.c.sop_uid).where(_TI.c.sop_uid.in_(sop_uids))).scalars())

    def studies(self, uids: list[str]) -> dict[str, tuple[int, str]]:
        rows = self.conn.execute(select(_TST.c.id, _TST.c.study_uid, _TST.c.state).where(_TST.c.study_uid.in_(uids)))
        return {uid: (sid, state) for sid, uid, state in rows}

    def insert_study(self, row: dict[str, Any]) -> int:
        return int(self.conn.execute(insert(_TST).values(**row)).inserted_primary_key[0])  # type: ignore[index]

    def bump_study(self, study_id: int, n: int, now: datetime) -> None:
        self.conn.execute(update(_TST).where(_TST.c.id == study_id).values(
            state=str(StudyState.RECEIVING), last_received_at=now, instance_count=_TST.c.instance_count + n))

    def series(self, uids: list[str]) -> dict[str, int]:
        rows = self.conn.execute(select(_TSE.c.series_uid, _TSE.c.id).where(_TSE.c.series_uid.in_(uids)))
        return {uid: sid for uid, sid in rows}

    def insert_series(self, row: dict[str, Any]) -> int:
        return int(self.conn.execute(insert(_TSE).values(**row)).inserted_primary_key[0])  # type: ignore[index]

    def bump_series(self, series_id: int, n: int) -> None:
        self.conn.execute(update(_TSE).where(_TSE.c.id == series_id).values(instance_count=_TSE.c.instance_count + n))

    def insert_instances(self, rows: list[dict[str, Any]]) -> list[int]:
        return list(self.conn.execute(insert(_TI).returning(_TI.c.id, sort_by_parameter_order=True), rows).scalars())

    def insert_audits(self, rows: list[dict[str, Any]]) -> None:
        self.conn.execute(insert(_TA), rows)


@functools.lru_cache(maxsize=8)
def _datetime_processor(dialect: Dialect) -> Callable[[datetime], Any]:
    """How the dialect stores a DateTime (SQLite: its ISO text), looked up once per dialect instead of once per
    batch (SQLAlchemy's type lookup cost ~0.1 ms, a tenth of the listener's own CPU per lone C-STORE)."""
    process = DateTime().dialect_impl(dialect).bind_processor(dialect)
    return process if process is not None else (lambda v: v)


class SqliteWriter:
    """The same statements through the sqlite3 driver (the caller holds BEGIN IMMEDIATE)."""

    def __init__(self, db: sqlite3.Connection, dialect: Dialect) -> None:
        self.db = db
        self._dt: Callable[[datetime], Any] = _datetime_processor(dialect)

    @staticmethod
    def _marks(n: int) -> str:
        return ",".join("?" * n)

    def existing(self, sop_uids: list[str]) -> set[str]:
        sql = f"SELECT sop_uid FROM {_TI.name} WHERE sop_uid IN ({self._marks(len(sop_uids))})"
        return {row[0] for row in self.db.execute(sql, sop_uids)}

    def studies(self, uids: list[str]) -> dict[str, tuple[int, str]]:
        sql = f"SELECT id, study_uid, state FROM {_TST.name} WHERE study_uid IN ({self._marks(len(uids))})"
        return {uid: (sid, state) for sid, uid, state in self.db.execute(sql, uids)}

    def _insert(self, table: Any, row: dict[str, Any]) -> int:
        values = [self._dt(v) if isinstance(v, datetime) else v for v in row.values()]
        sql = f"INSERT INTO {table.name} ({','.join(row)}) VALUES ({self._marks(len(row))})"
        cur = self.db.execute(sql, values)
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def insert_study(self, row: dict[str, Any]) -> int:
        return self._insert(_TST, row)

    def bump_study(self, study_id: int, n: int, now: datetime) -> None:
        self.db.execute(f"UPDATE {_TST.name} SET state = ?, last_received_at = ?, "
                        "instance_count = instance_count + ? WHERE id = ?",
                        (str(StudyState.RECEIVING), self._dt(now), n, study_id))

    def series(self, uids: list[str]) -> dict[str, int]:
        sql = f"SELECT series_uid, id FROM {_TSE.name} WHERE series_uid IN ({self._marks(len(uids))})"
        return {uid: sid for uid, sid in self.db.execute(sql, uids)}

    def insert_series(self, row: dict[str, Any]) -> int:
        return self._insert(_TSE, row)

    def bump_series(self, series_id: int, n: int) -> None:
        self.db.execute(f"UPDATE {_TSE.name} SET instance_count = instance_count + ? WHERE id = ?", (n, series_id))

    def insert_instances(self, rows: list[dict[str, Any]]) -> list[int]:
        return [self._insert(_TI, row) for row in rows]

    def insert_audits(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        cols = list(rows[0])
        self.db.executemany(
            f"INSERT INTO {_TA.name} ({','.join(cols)}) VALUES ({self._marks(len(cols))})",
            [[self._dt(r[c]) if isinstance(r[c], datetime) else r[c] for c in cols] for r in rows])
