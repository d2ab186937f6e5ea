"""The node's liveness never waits for Docker: a busy engine once took 60 s to list
containers and, with the orphan clean-up on the heartbeat thread, live nodes were judged
LOST in the middle of a 200-task deal (ops/bench). Fakes: fakeredis, a stub Celery, a runner
whose container listing hangs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis

from pool.settings import Settings
from workers.node import WorkerNode, seen_key
from workers.runner import FakeRunner

ADDRESS = "0x00000000000000000000000000000000000000aa"


class HangingRunner(FakeRunner):
    """``label_values`` (the janitor's container listing) blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.listing = threading.Event()
        self.release = threading.Event()

    def label_values(self, label: str, selector: dict[str, str]) -> set[str]:
        self.listing.set()
        self.release.wait(30)
        return set()


def test_heartbeats_go_on_while_the_janitor_waits_for_docker(tmp_path: Path) -> None:
    sent: list[Any] = []
    celery = SimpleNamespace(send_task=lambda name, **kw: sent.append((name, kw)))
    runner = HangingRunner()
    node = WorkerNode(
        Settings(redis_url="redis://127.0.0.1:1/0", worker_name="t"),
        None,  # type: ignore[arg-type]  # no chain needed for liveness
        SimpleNamespace(address=ADDRESS),  # type: ignore[arg-type]
        celery,
        runner,
        None,  # type: ignore[arg-type]
        workdir=tmp_path,
    )
    node.redis = fakeredis.FakeRedis()
    stop = threading.Event()
    threads = [
        threading.Thread(target=node.heartbeat_forever, args=(0.05, stop), daemon=True),
        threading.Thread(target=node.janitor_forever, args=(0.05, stop), daemon=True),
    ]
    for thread in threads:
        thread.start()
    try:
        # Given the janitor is stuck in a Docker call
        assert runner.listing.wait(5)
        before = len(sent)
        time.sleep(0.5)
        # Then the node still writes its liveness and sends heartbeats
        seen = float(node.redis.get(seen_key(ADDRESS)))
        assert time.time() - seen < 0.3
        assert len(sent) - before >= 4
    finally:
        runner.release.set()
        stop.set()
        for thread in threads:
            thread.join(5)
