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

from pool import keys
from pool.messages import MessageSigner, Messenger, heartbeat_time
from pool.settings import Settings
from testing.celery import FAKE_DOMAIN, FakeCelery, fake_messenger
from testing.runner import FakeRunner
from workers.node import WorkerNode

KEY = "0x" + "5a" * 32
ADDRESS = MessageSigner(KEY, FAKE_DOMAIN).address.lower()


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
    messages, celery = fake_messenger(KEY)
    sent = celery.messages
    runner = HangingRunner()
    node = WorkerNode(
        Settings(redis_url="redis://127.0.0.1:1/0", worker_name="t"),
        None,  # type: ignore[arg-type]  # no chain needed for liveness
        SimpleNamespace(address=ADDRESS),  # type: ignore[arg-type]
        messages,
        runner,
        None,  # type: ignore[arg-type]
        redis=fakeredis.FakeRedis(),
        workdir=tmp_path,
    )
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
        # Then the node still writes its liveness (its last signed heartbeat) and sends
        # heartbeats
        seen = heartbeat_time(node.redis.get(keys.node_seen(ADDRESS)), ADDRESS, FAKE_DOMAIN)
        assert seen is not None and time.time() - seen < 1.3  # (issued in whole seconds)
        assert len(sent) - before >= 4
    finally:
        runner.release.set()
        stop.set()
        for thread in threads:
            thread.join(5)


class ChainSaysActive:
    """The chain of a task that is ACTIVE, with no contribution from this node (what the
    first job of a node sees while it computes)."""

    def __init__(self) -> None:
        self.read: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def read(*args: Any, **kwargs: Any) -> Any:
            self.read.append(name)
            raise AssertionError(f"resume read the chain ({name}) for a job of this life")

        return read


def _node(tmp_path: Path, client: Any, celery: FakeCelery) -> WorkerNode:
    return WorkerNode(
        Settings(redis_url="redis://127.0.0.1:1/0", worker_name="t"),
        client,
        SimpleNamespace(address=ADDRESS),  # type: ignore[arg-type]
        Messenger(celery, MessageSigner(KEY, FAKE_DOMAIN)),
        FakeRunner(),
        None,  # type: ignore[arg-type]
        workdir=tmp_path,
    )


def test_resume_takes_only_what_a_previous_life_left_not_the_first_jobs_of_this_one(
    tmp_path: Path,
) -> None:
    # Given a node that started with one task directory left by its previous life
    old = "0x" + "01" * 32
    (tmp_path / ADDRESS / old).mkdir(parents=True)
    (tmp_path / ADDRESS / old / "state.json").write_text("not json: a torn write")
    celery = FakeCelery()
    chain = ChainSaysActive()
    node = _node(tmp_path, chain, celery)
    # And a first job of this life that got its authorization before resume ran (resume
    # runs on a thread beside the jobs)
    new = "0x" + "02" * 32
    (tmp_path / ADDRESS / new).mkdir()
    (tmp_path / ADDRESS / new / "state.json").write_text('{"authorization": "0x00"}')
    # When the node resumes
    outcomes = node.resume()
    # Then it looked at the leftover only (unreadable: skipped), never at the running job:
    # no chain read, no report, its directory untouched
    assert node.leftovers == [old] and outcomes == [] and chain.read == [] and not celery.messages
    assert (tmp_path / ADDRESS / new / "state.json").exists()
