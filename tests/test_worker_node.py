"""The node's liveness never waits for Docker: a busy engine once took 60 s to list
containers and, with the orphan clean-up on the heartbeat thread, live nodes were judged
LOST in the middle of a 200-task deal (ops/bench). A node resumes only what its previous
life left. An upload asked twice (anyone on Redis can ask) publishes once and reports the same
link. Fakes: fakeredis, a stub Celery, a runner whose container listing hangs, a chain that
answers one question."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis

from poco.types import ContributionStatus
from pool import keys
from pool.messages import REPORT, MessageSigner, Messenger, heartbeat_time
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


class ChainSaysRevealed:
    """The chain of a task this node revealed (what an upload request checks)."""

    def view_contribution(self, taskid: str, worker: str) -> Any:
        return SimpleNamespace(status=ContributionStatus.PROVED)


class CountingPublisher:
    storage = "ipfs"

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def publish(self, task_id: str, data: bytes) -> str:
        self.published.append((task_id, data))
        return "/ipfs/QmResult"


def _reports(celery: FakeCelery) -> list[dict[str, Any]]:
    return [json.loads(m.args[0]["body"]) for m in celery.of(REPORT.name)]


def test_an_upload_asked_twice_publishes_once_and_gives_the_same_link_again(
    tmp_path: Path,
) -> None:
    # Given a node that revealed a task and keeps its zipped result
    taskid = "0x" + "03" * 32
    task_dir = tmp_path / ADDRESS / taskid
    task_dir.mkdir(parents=True)
    (task_dir / "result.zip").write_bytes(b"zipped result")
    (task_dir / "state.json").write_text(
        json.dumps({"digest": "0x" + "00" * 32, "zip": str(task_dir / "result.zip")})
    )
    celery = FakeCelery()
    node = _node(tmp_path, ChainSaysRevealed(), celery)
    publisher = CountingPublisher()
    node.publisher = publisher  # type: ignore[assignment]
    # When anyone on Redis asks it to upload (early, before the scheduler's own request),
    # and then the scheduler asks
    first = node.upload(taskid)
    second = node.upload(taskid)
    # Then the result was published once, and both requests reported its link
    assert publisher.published == [(taskid, b"zipped result")]
    assert first.status == second.status == "RESULT_UPLOADED"
    uploaded = [r for r in _reports(celery) if r["status"] == "RESULT_UPLOADED"]
    assert [r["result_link"] for r in uploaded] == [uploaded[0]["result_link"]] * 2
    assert "QmResult" in uploaded[0]["result_link"]
    # And only the link is left of the task's files
    assert sorted(p.name for p in task_dir.iterdir()) == ["state.json"]


def test_an_upload_asked_of_a_node_with_nothing_to_publish_sends_the_scheduler_elsewhere(
    tmp_path: Path,
) -> None:
    celery = FakeCelery()
    node = _node(tmp_path, ChainSaysRevealed(), celery)
    taskid = "0x" + "04" * 32
    outcome = node.upload(taskid)
    assert outcome.status == "REVEALED"
    (report,) = _reports(celery)
    assert report["status"] == "REVEALED" and report["upload_failed"] is True
