"""What the broker holds: messages waiting per queue, and which workers answer.

Redis keeps each Celery queue as a list (``LLEN``; kombu puts messages sent with a priority in
sibling lists ``<queue>\\x06\\x16<priority>``, counted too). The embedded filesystem broker keeps one
file per message, ``<ms>_<uuid>.<queue>.msg``, in ``<data_dir>/broker/queue``. The broker only says
how many messages wait; what runs and for how long comes from the ledger (:mod:`.monitoring`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from dicom_fusion.service.config import Settings
from dicom_fusion.service.errors import BrokerError
from dicom_fusion.service.jobs.queues import priority_queues

QUEUES = ("cpu", "gpu", "io")
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)  # kombu's default steps besides 0 (which uses the plain key)


@dataclass(frozen=True)
class BrokerQueue:
    name: str
    depth: int  # messages waiting in the broker
    oldest_age_seconds: float | None  # age of the oldest waiting message, when the broker can tell


def broker_kind(settings: Settings) -> str:
    return "filesystem" if settings.embedded_broker else settings.broker_url.split(":", 1)[0]


def queue_depths(settings: Settings, *, timeout: float = 2.0) -> dict[str, BrokerQueue]:
    """Messages waiting per queue. Raises :class:`BrokerError` when the broker cannot be read."""
    if settings.embedded_broker:
        return _filesystem_depths(settings.broker_dir / "queue")
    return _redis_depths(settings.broker_url, timeout)


def _filesystem_depths(folder: Path) -> dict[str, BrokerQueue]:
    if not folder.is_dir():
        return {q: BrokerQueue(q, 0, None) for q in QUEUES}
    now = time.time()
    out = {}
    try:
        for q in QUEUES:
            ages = []
            for name in priority_queues(q):  # cpu.urgent, cpu, cpu.background: one depth per stage queue
                for f in folder.glob(f"*.{name}.msg"):
                    try:
                        ages.append(now - f.stat().st_mtime)
                    except FileNotFoundError:  # taken by a worker while we looked
                        continue
            out[q] = BrokerQueue(q, len(ages), max(ages) if ages else None)
    except OSError as exc:
        raise BrokerError(f"cannot read the embedded broker folder {folder}: {exc.strerror}") from exc
    return out


def _redis_depths(url: str, timeout: float) -> dict[str, BrokerQueue]:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise BrokerError(f"queue depths are read from Redis or the embedded broker; broker.url "
                          f"scheme {url.split(':', 1)[0]!r} is not supported")
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        pipe = client.pipeline(transaction=False)
        for q in QUEUES:
            for name in priority_queues(q):  # the urgent, normal and background queue of each stage queue
                pipe.llen(name)
                for p in _PRIORITY_STEPS:
                    pipe.llen(f"{name}{_PRIORITY_SEP}{p}")
        counts = pipe.execute()
    except redis.RedisError as exc:
        raise BrokerError(f"Redis broker unreachable ({type(exc).__name__}: {exc}); check broker.url "
                          "and that Redis is running") from exc
    finally:
        client.close()
    step = len(priority_queues(QUEUES[0])) * (1 + len(_PRIORITY_STEPS))
    return {q: BrokerQueue(q, int(sum(counts[i * step:(i + 1) * step])), None) for i, q in enumerate(QUEUES)}


def check_broker(settings: Settings, *, timeout: float = 2.0) -> str:
    """Readiness: a short description when the broker answers; raises :class:`BrokerError` if not."""
    if settings.embedded_broker:
        folder = settings.broker_dir / "queue"
        if not folder.is_dir():
            raise BrokerError(f"embedded broker folder {folder} does not exist; start `dicom-fusion serve`")
        return f"filesystem broker at {folder}"
    depths = _redis_depths(settings.broker_url, timeout)
    return f"redis, {sum(d.depth for d in depths.values())} message(s) waiting"


def workers_online(app: Celery, *, timeout: float = 0.5) -> list[str] | None:
    """Worker names answering a broadcast ping; None when the broker has no remote control (embedded)."""
    if not app.conf.worker_enable_remote_control:
        return None
    try:
        replies = app.control.ping(timeout=timeout) or []
    except Exception as exc:  # kombu raises many connection error types
        raise BrokerError(f"cannot ping workers through the broker: {type(exc).__name__}: {exc}") from exc
    return sorted(name for reply in replies for name in reply)
