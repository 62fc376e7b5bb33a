"""Queue depths count every priority's queue of a stage queue (urgent, normal, background), on the embedded
broker's real message files and on a real Redis."""
from __future__ import annotations

import shutil
from pathlib import Path

from conftest import require

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.ops.broker import queue_depths


def test_embedded_broker_depths_add_up_the_priorities(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "var")
    folder = settings.broker_dir / "queue"
    folder.mkdir(parents=True)
    for name in ("1_a.cpu.urgent.msg", "2_b.cpu.msg", "3_c.cpu.background.msg", "4_d.io.urgent.msg"):
        (folder / name).write_text("{}")
    depths = queue_depths(settings)
    assert {q: d.depth for q, d in depths.items()} == {"cpu": 3, "gpu": 0, "io": 1}


def test_redis_depths_add_up_the_priorities(tmp_path: Path) -> None:
    require(shutil.which("redis-server") is not None, "redis-server")
    import redis

    from dicom_fusion.service.demo.components import start_redis

    server = start_redis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(server.url)
        client.rpush("gpu.urgent", "m1")
        client.rpush("gpu", "m2", "m3")
        client.rpush("gpu.background\x06\x163", "m4")
        depths = queue_depths(load_settings(data_dir=tmp_path / "var", broker={"url": server.url}))
        assert {q: d.depth for q, d in depths.items()} == {"cpu": 0, "gpu": 4, "io": 0}
        client.close()
    finally:
        server.stop()
