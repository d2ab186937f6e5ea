"""Fault injection on the devnet with the real services (issue 6).

Every case ends with every task COMPLETED or FAILED (claimed) on chain, MongoDB agreeing with
the chain, and nothing duplicated (one deal document, one task document per task, each
status reached once in a task's timeline, one contribution per worker).

How the faults are made:

* the scheduler is "killed" at an exact point by raising :class:`pool_fixtures.Crash` there
  (no ``except Exception`` of the scheduler catches it) and then dropped without any clean-up
  of its own, its Redis tick lock left held; a new one starts on the same MongoDB (which, as
  a separate service, survives) with a fresh chain client and nonce counter;
* worker nodes are real ``workerpool worker`` processes, killed with SIGKILL (by the test,
  or by themselves at an exact point with ``WORKERPOOL_FAULT_INJECT``), then restarted;
* Redis is a redis-server of the test's own, stopped for 10 s (without persistence: its
  queues are lost) and started again on the same port;
* the chain node is reached through a proxy that refuses 15 % of the calls, loses the answer
  of 15 % more after forwarding them (the transaction *was* sent) and delays the others.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from devnet_fixtures import DevnetHandle
from faulty_rpc import FaultyRpcProxy
from pool_fixtures import Crash, RunningPool, pool_running

from devnet.requester import MatchedDeal, deal_params
from poco import actions
from poco.tags import encode_tag
from poco.types import ChainTaskStatus, ContributionStatus

pytestmark = pytest.mark.devnet

TIMEREF = 300  # category 0 (XS)
# trust 2 (one fresh contribution is enough) takes the classic path; trust 1 uses
# contributeAndFinalize, one transaction by the worker
Doc = dict[str, Any]


def _completed(doc: Doc) -> bool:
    return doc.get("status") == "COMPLETED"


def _final(doc: Doc) -> bool:
    return doc.get("status") in ("COMPLETED", "FAILED")


def assert_chain_and_store_agree(pool: RunningPool, deal: MatchedDeal) -> list[Doc]:
    store, client = pool.store, pool.devnet.client
    assert store.deals.count_documents({"chainDealId": deal.dealid}) == 1
    assert store.tasks.count_documents({"chainDealId": deal.dealid}) == deal.volume
    docs = []
    for taskid in deal.taskids():
        doc = store.task(taskid)
        assert doc is not None
        chain = client.view_task(taskid)
        assert chain.status in (ChainTaskStatus.COMPLETED, ChainTaskStatus.FAILED)
        assert doc["status"] == chain.status.name, (taskid, doc["status"], chain.status)
        statuses = [event["status"] for event in doc["timeline"]]
        # transitions only: a note (e.g. "planned 1 more replicate") repeats the status
        reached = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
        rounds = 1 + reached.count("REOPENED")  # a reopened task reaches consensus again
        for status, most in [
            *[(s, 1) for s in ("INITIALIZED", "REOPENED", "FINALIZED", "COMPLETED", "FAILED")],
            ("CONSENSUS_REACHED", rounds),
        ]:
            assert reached.count(status) <= most, f"{taskid}: {status} repeated: {doc['timeline']}"
        if chain.status == ChainTaskStatus.COMPLETED:
            assert chain.results == doc["resultLink"].encode()
            workers = [r["worker"] for r in store.replicates_of(taskid)]
            assert len(workers) == len(set(workers))
            assert {w.lower() for w in chain.contributors} <= set(workers)
        docs.append(doc)
    return docs


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def faulty_pool(
    chain_snapshot: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> Iterator[RunningPool]:
    # an interrupted finalize is looked at again after WORKERPOOL_TX_TIMEOUT + 10 s
    with pool_running(
        chain_snapshot, redis_url, ipfs_api_url, tmp_path, db="faults", WORKERPOOL_TX_TIMEOUT="8"
    ) as pool:
        yield pool


# ---- the scheduler killed -----------------------------------------------------------------
def test_scheduler_killed_between_storing_a_deal_and_advancing_the_cursor(
    faulty_pool: RunningPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = faulty_pool
    store = pool.store
    original = store.advance_cursor
    crashed_at: list[int] = []

    def advance_then_die(name: str, block: int) -> None:
        # once dead, dead: the process's other threads (the block listen beside the tick)
        # move nothing either
        if crashed_at or store.deals.count_documents({}):
            crashed_at.append(block)
            raise Crash("killed after storing the deal, before moving the cursor")
        original(name, block)

    monkeypatch.setattr(store, "advance_cursor", advance_then_die)
    pool.start_worker(0)
    deal = pool.match(volume=2, params=deal_params("crash-test"))
    _wait(pool.process.crashed.is_set, 30, "the injected crash")  # type: ignore[union-attr]
    # Given the deal and its tasks are stored and the cursor is still before its block
    assert store.tasks.count_documents({"chainDealId": deal.dealid}) == 2
    cursor = store.get_cursor(pool.scheduler.deals.cursor_name)
    assert cursor is None or cursor < deal.receipt.block_number
    # When a new scheduler starts (the dead one's tick lock still held)
    monkeypatch.setattr(store, "advance_cursor", original)
    pool.restart_scheduler()
    # Then it reads the same block again, stores nothing twice, and the deal completes
    pool.wait_tasks(deal.taskids(), _completed, timeout=120)
    assert_chain_and_store_agree(pool, deal)
    assert store.get_cursor(pool.scheduler.deals.cursor_name) >= deal.receipt.block_number  # type: ignore[operator]


def test_scheduler_killed_between_contribute_and_finalize(
    faulty_pool: RunningPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = faulty_pool
    original = actions.finalize
    sent: list[str] = []

    def send_then_die(wallet: Any, taskid: str, results: bytes, callback: bytes = b"") -> Any:
        # the finalize transaction leaves, then the process dies before seeing its receipt
        fn = wallet.client.hub.functions.finalize(bytes.fromhex(taskid[2:]), results, callback)
        sent.append(str(wallet.transact(fn, wait=False)))
        raise Crash("killed after sending finalize")

    monkeypatch.setattr(actions, "finalize", send_then_die)
    pool.start_worker(1)
    deal = pool.match(
        params=deal_params("finalize-crash"), trust=2
    )  # the classic path: contribute, reveal, finalize
    (taskid,) = deal.taskids()
    _wait(lambda: bool(sent), 90, "the finalize transaction")
    # Given a worker contributed, revealed and uploaded, and the scheduler died in finalize
    doc = pool.store.task(taskid)
    assert doc is not None and doc["status"] == "FINALIZING"
    monkeypatch.setattr(actions, "finalize", original)
    pool.restart_scheduler()
    # Then the new scheduler finds the task completed on chain and records it, no second tx
    (doc,) = pool.wait_tasks([taskid], _completed, timeout=90)
    assert_chain_and_store_agree(pool, deal)
    contribution = pool.devnet.client.view_contribution(taskid, pool.worker_address(1))
    assert contribution.status == ContributionStatus.PROVED
    assert "interrupted" in " ".join(str(e.get("note", "")) for e in doc["timeline"])


# ---- workers killed and restarted ---------------------------------------------------------
def test_worker_killed_after_contribute_reveals_when_restarted(faulty_pool: RunningPool) -> None:
    pool = faulty_pool
    node = pool.start_worker(2, WORKERPOOL_FAULT_INJECT="crash-after-contribute")
    deal = pool.match(
        params=deal_params("contribute-crash"), trust=2
    )  # the classic path: contribute, reveal, finalize
    (taskid,) = deal.taskids()
    worker = pool.worker_address(2)
    # Given the node killed itself right after its contribution was mined (not reported)
    node.wait(timeout=90)
    assert pool.devnet.client.view_contribution(taskid, worker).status == (
        ContributionStatus.CONTRIBUTED
    )
    assert pool.chain_status(taskid) == ChainTaskStatus.REVEALING  # trust 1: consensus
    # When it is started again (same key, same work directory)
    pool.start_worker(2)
    # Then it reveals its own contribution, and the task completes with it
    pool.wait_tasks([taskid], _completed, timeout=90)
    assert_chain_and_store_agree(pool, deal)
    assert pool.devnet.client.view_contribution(taskid, worker).status == (
        ContributionStatus.PROVED
    )
    assert pool.store.replicate(taskid, worker)["status"] == "COMPLETED"  # type: ignore[index]
    assert f"resume {taskid}: REVEALING" in (pool.tmp / "worker-2.log").read_text()


def test_worker_killed_after_contribute_for_good_is_replaced_after_a_reopen(
    faulty_pool: RunningPool,
) -> None:
    pool = faulty_pool
    node = pool.start_worker(10, WORKERPOOL_FAULT_INJECT="crash-after-contribute")
    deal = pool.match(
        params=deal_params("gone for good"), trust=2
    )  # the classic path: contribute, reveal, finalize
    (taskid,) = deal.taskids()
    dead = pool.worker_address(10)
    node.wait(timeout=90)
    # Given the contribution reached consensus on chain but its report never came, the
    # scheduler learns it from the chain and asks the (dead) winner to reveal
    pool.wait_tasks([taskid], lambda d: d.get("status") == "CONSENSUS_REACHED", timeout=30)
    pool.start_worker(11)
    # When the reveal deadline passes with no reveal
    pool.devnet.increase_time(2 * TIMEREF + 1)
    # Then the task is reopened, the silent winner rejected, and another worker completes it
    (doc,) = pool.wait_tasks([taskid], _completed, timeout=90)
    assert_chain_and_store_agree(pool, deal)
    assert "REOPENED" in [e["status"] for e in doc["timeline"]]
    client = pool.devnet.client
    assert client.view_contribution(taskid, dead).status == ContributionStatus.REJECTED
    assert client.view_contribution(taskid, pool.worker_address(11)).status == (
        ContributionStatus.PROVED
    )


def test_worker_killed_while_computing_computes_again_when_restarted(
    faulty_pool: RunningPool,
) -> None:
    pool = faulty_pool
    engine = docker.from_env()
    worker = pool.worker_address(3)
    label = {"label": f"workerpool.worker={worker}"}
    node = pool.start_worker(3)
    deal = pool.match(app="sleep", params=deal_params("3"))
    (taskid,) = deal.taskids()
    _wait(lambda: bool(engine.containers.list(filters=label)), 60, "the app container")
    # Given the node is killed with -9 while its app runs (the container is left behind)
    pool.kill_worker(node)
    assert engine.containers.list(all=True, filters=label)
    # When it is started again at once
    pool.start_worker(3)
    # Then the leftover container is removed, the app runs again, the task completes with it
    pool.wait_tasks([taskid], _completed, timeout=90)
    assert_chain_and_store_agree(pool, deal)
    assert (
        pool.devnet.client.view_task(taskid).contributors
        == (pool.devnet.client.view_task(taskid).contributors[:1])
    )
    assert [c.lower() for c in pool.devnet.client.view_task(taskid).contributors] == [worker]
    assert engine.containers.list(all=True, filters=label) == []


# ---- Redis and the chain node -------------------------------------------------------------
class OwnRedis:
    """A redis-server of this test alone, without persistence, that can be stopped."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server not installed (ops/test installs it)"
        self.proc = subprocess.Popen(
            [
                *(binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=subprocess.DEVNULL,
        )
        _wait(self._answers, 10, "redis-server")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def test_redis_stopped_for_10_seconds_during_a_deal(
    chain_snapshot: DevnetHandle, ipfs_api_url: str, app_images: dict[str, str], tmp_path: Path
) -> None:
    own = OwnRedis(tmp_path)
    own.start()
    try:
        with pool_running(
            chain_snapshot, own.url, ipfs_api_url, tmp_path, db="redis-outage"
        ) as pool:
            pool.start_worker(4)
            pool.start_worker(5)
            # more tasks than the 4 slots: some jobs wait in Redis when it goes away
            deal = pool.match(app="sleep", volume=6, params=deal_params("3"))
            pool.wait_tasks(
                deal.taskids()[:1], lambda d: d.get("status") not in ("RECEIVED",), timeout=60
            )
            # When Redis goes away for 10 s mid-deal, and comes back empty
            own.stop()
            time.sleep(10)
            own.start()
            # Then the owed jobs are queued again from MongoDB and every task completes
            pool.wait_tasks(deal.taskids(), _completed, timeout=180)
            assert_chain_and_store_agree(pool, deal)
    finally:
        own.stop()


def test_a_flaky_rpc_node_loses_nothing_and_duplicates_nothing(
    chain_snapshot: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    with (
        FaultyRpcProxy(chain_snapshot.info["rpc_url"]) as proxy,
        pool_running(
            chain_snapshot,
            redis_url,
            ipfs_api_url,
            tmp_path,
            db="flaky-rpc",
            IEXEC_PRIVATE_CHAIN_ADDRESS=proxy.url,
            WORKERPOOL_RPC_RETRIES="8",
            WORKERPOOL_TX_REPLACE_AFTER="3",
        ) as pool,
    ):
        pool.start_worker(6)
        pool.start_worker(7)
        deal = pool.match(volume=3, params=deal_params("flaky"))
        pool.wait_tasks(deal.taskids(), _completed, timeout=240)
        assert_chain_and_store_agree(pool, deal)
        # the faults did happen, several times each (a task costs ~6 calls since the chain
        # reads that cannot change are made once: the counts follow the proxy's seeded draws)
        assert proxy.counts["refused"] >= 5 and proxy.counts["lost"] >= 5, proxy.counts
        print(f"flaky RPC: {dict(proxy.counts)}")


# ---- deadlines and bad apps ---------------------------------------------------------------
def test_a_task_nobody_can_serve_is_claimed_at_its_final_deadline(
    faulty_pool: RunningPool,
) -> None:
    pool = faulty_pool
    pool.start_worker(8)  # a standard worker: nobody serves GPU
    deal = pool.match(tag=encode_tag("gpu"))
    (taskid,) = deal.taskids()
    (doc,) = pool.wait_tasks([taskid], lambda d: "no live worker" in d.get("waitingReason", ""))
    # When anvil's clock passes the final deadline
    pool.devnet.increase_time(10 * TIMEREF + 5)
    # Then the task is claimed: FAILED on chain and in MongoDB, the requester refunded
    (doc,) = pool.wait_tasks([taskid], _final, timeout=60)
    assert_chain_and_store_agree(pool, deal)
    assert doc["status"] == "FAILED" and "claimed" in doc["timeline"][-1]["note"]


def test_bad_apps_are_stopped_and_recorded_and_the_worker_unharmed(
    faulty_pool: RunningPool,
) -> None:
    pool = faulty_pool
    pool.start_worker(9, WORKERPOOL_APP_MAX_RUNTIME="10")
    deals = {
        mode: pool.match(app="evil", params=deal_params(mode))
        for mode in ("symlink", "dotdot", "dirlink")
    }
    deals["logflood"] = pool.match(app="evil", params=deal_params("logflood 20"))
    deals["hang"] = pool.match(app="sleep", params=deal_params("3600"))
    deals["fill"] = pool.match(app="bigout", params=deal_params("50"))  # > 5 MB limit
    ids = [deal.taskids()[0] for deal in deals.values()]

    # Then every task completes: the attacks and runaways with an error result
    pool.wait_tasks(ids, _completed, timeout=150)

    def replicate(mode: str) -> Doc:
        (rep,) = pool.store.replicates_of(deals[mode].taskids()[0])
        return rep

    # And each attack through the output is refused, each runaway stopped, with the reason
    assert "result.txt' escapes /iexec_out" in replicate("symlink")["reason"]
    assert "../etc/passwd' escapes /iexec_out" in replicate("dotdot")["reason"]
    assert "/iexec_out/up escapes /iexec_out (symlink to /)" in replicate("dirlink")["reason"]
    assert "time limit of 10 s" in replicate("hang")["reason"]
    assert "output exceeded the limit" in replicate("fill")["reason"]
    for mode in ("symlink", "dotdot", "dirlink", "hang", "fill"):
        assert "COMPUTE_FAILED" in [e["status"] for e in replicate(mode)["timeline"]], mode
    # And the log flood (20 MB on stdout) completes with its result; only the tail of its
    # log is kept
    assert "COMPUTE_FAILED" not in [e["status"] for e in replicate("logflood")["timeline"]]
    # And the worker is alive and computes the next deal
    ok = pool.match(params=deal_params("still alive"))
    pool.wait_tasks(ok.taskids(), _completed, timeout=60)
    for deal in deals.values():
        assert_chain_and_store_agree(pool, deal)


def test_result_store_unreachable_falls_back_to_the_classic_path_and_recovers(
    chain_snapshot: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> None:
    with pool_running(
        chain_snapshot,
        redis_url,
        ipfs_api_url,
        tmp_path,
        db="ipfs-down",
        REVEAL_TIMEOUT_PERIOD="2000",
    ) as pool:
        # Given a worker whose IPFS node is unreachable, on a trust-1 task
        node = pool.start_worker(12, IEXEC_IPFS_PORT="1")
        deal = pool.match(params=deal_params("ipfs down"))
        (taskid,) = deal.taskids()
        worker = pool.worker_address(12)

        def revealed(_: Doc) -> bool:
            rep = pool.store.replicate(taskid, worker)
            return rep is not None and rep["status"] in ("REVEALED", "RESULT_UPLOADING")

        # Then it could not publish before contributeAndFinalize: it contributed and revealed
        pool.wait_tasks([taskid], revealed, timeout=60)
        assert pool.chain_status(taskid) == ChainTaskStatus.REVEALING
        # When the node comes back with its IPFS reachable
        pool.kill_worker(node)
        pool.start_worker(12)
        # Then the scheduler asks it again for the upload, and the task completes
        pool.wait_tasks([taskid], _completed, timeout=90)
        assert_chain_and_store_agree(pool, deal)
