"""What the scheduler's passes cost, on fakes of the chain and Celery and the mongomock store:
a tick's store queries do not grow with the number of running tasks (one query per pass,
replicates read in ``$in`` batches, serving workers counted once per queue), and chain state
read once is passed along instead of read again (docs/performance.md, hot spots 7 and 8)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mongomock_ng as mongomock
import pytest
from eth_utils import keccak

from poco.chain import Receipt
from poco.types import ChainTaskStatus, Contribution, ContributionStatus, Task
from pool import store as store_mod
from pool.celery_app import REPLICATE_QUEUES, REVEAL_TASK
from pool.settings import Settings
from pool.states import ReplicateStatus, TaskStatus
from pool.store import Store
from scheduler import lifecycle as lifecycle_mod
from scheduler.service import Scheduler

STANDARD = REPLICATE_QUEUES["standard"]
GPU = REPLICATE_QUEUES["gpu"]
POOL = "0x" + "11" * 20
WORKER_A = "0x" + "aa" * 20
WORKER_B = "0x" + "bb" * 20
CONSENSUS = "0x" + "c0" * 32
OTHER_HASH = "0x" + "0f" * 32
NOW = 1_000_000


def taskid(n: int) -> str:
    return "0x" + f"{n:064x}"


# ---- fakes ---------------------------------------------------------------------------------
@dataclass
class FakeChain:
    """viewTask / viewContribution answers per task, and a count of every read."""

    tasks: dict[str, Task] = field(default_factory=dict)
    contributions: dict[tuple[str, str], Contribution] = field(default_factory=dict)
    reads: Counter[str] = field(default_factory=Counter)
    hub_address: str = POOL

    def block_timestamp(self, block: int | str = "latest", max_age: float = 0.0) -> int:
        self.reads["block_timestamp"] += 1
        return NOW

    def view_task(self, tid: str) -> Task:
        self.reads["view_task"] += 1
        return self.tasks[tid]

    def view_contribution(self, tid: str, worker: str) -> Contribution:
        self.reads["view_contribution"] += 1
        return self.contributions[(tid, worker.lower())]


@dataclass
class FakeCelery:
    sent: list[tuple[str, list[Any], str]] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any], queue: str, **_: Any) -> None:
        self.sent.append((name, args, queue))


class CountingCollection:
    """A collection whose calls are counted (name of the collection, method)."""

    def __init__(self, inner: Any, name: str, calls: Counter[str]) -> None:
        self._inner, self._name, self._calls = inner, name, calls

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._inner, attr)
        if not callable(target):
            return target

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._calls[f"{self._name}.{attr}"] += 1
            return target(*args, **kwargs)

        return counted


def count_store_calls(store: Store) -> Counter[str]:
    calls: Counter[str] = Counter()
    for name in ("deals", "tasks", "replicates", "workers", "cursors"):
        setattr(store, name, CountingCollection(getattr(store, name), name, calls))
    return calls


def chain_task(tid: str, status: ChainTaskStatus, contributors: list[str], **kw: Any) -> Task:
    return Task(
        taskid=tid,
        status=status,
        dealid="0x" + "de" * 32,
        idx=0,
        timeref=300,
        contribution_deadline=NOW + 1000,
        reveal_deadline=kw.get("reveal_deadline", NOW + 600),
        final_deadline=NOW + 3000,
        consensus_value=kw.get("consensus_value", CONSENSUS),
        reveal_counter=kw.get("reveal_counter", 0),
        winner_counter=kw.get("winner_counter", len(contributors)),
        contributors=tuple(contributors),
        result_digest="0x" + "00" * 32,
        results=b"",
        results_timestamp=0,
        results_callback=b"",
    )


def contribution(status: ContributionStatus, result_hash: str = CONSENSUS) -> Contribution:
    return Contribution(
        status=status,
        result_hash=result_hash,
        result_seal="0x" + "00" * 32,
        enclave_challenge="0x" + "00" * 20,
        weight=1,
    )


@pytest.fixture
def store() -> Store:
    s = Store(mongomock.MongoClient()["workerpool-cost"])
    s.ensure_indexes()
    return s


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain()


@pytest.fixture
def scheduler(store: Store, chain: FakeChain) -> Scheduler:
    settings = Settings(pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL)
    wallet = type("FakeWallet", (), {"address": POOL, "client": chain})()
    return Scheduler(settings, store, chain, wallet, FakeCelery(), None)  # type: ignore[arg-type]


def add_tasks(
    store: Store, count: int, *, start: int = 0, queue: str = STANDARD, status: str = "RUNNING"
) -> list[str]:
    ids = [taskid(start + n) for n in range(count)]
    docs = [
        {
            "chainTaskId": tid,
            "chainDealId": "0x" + "de" * 32,
            "index": n,
            "status": status,
            "trust": 1,
            "queue": queue,
            "timeref": 300,
            "contributionDeadline": NOW + 1000,
            "finalDeadline": NOW + 3000,
            "jobsQueued": 1,
            "replicatesNeeded": 1,
            "replicatesGranted": 1,
            # what a real task carries and a pass over every task should not read
            "timeline": [{"status": "RECEIVED", "at": n, "note": "x" * 200}] * 10,
        }
        for n, tid in enumerate(ids)
    ]
    store.save_deal({"chainDealId": f"0x{start:064x}"}, docs)
    return ids


def reconcile_cost(scheduler: Scheduler, store: Store) -> Counter[str]:
    calls = count_store_calls(store)
    scheduler.lifecycle.reconcile(scheduler_report())
    return calls


def scheduler_report() -> Any:
    from scheduler.service import TickReport

    return TickReport()


# ---- hot spot 7: reconcile ------------------------------------------------------------------
def make_running_pool(store: Store, waiting: int, computing: int) -> None:
    """``waiting`` tasks nobody took (half on the standard queue, half on gpu) and
    ``computing`` tasks whose replicate is under way; one live standard worker."""
    add_tasks(store, waiting // 2, start=0, queue=STANDARD)
    add_tasks(store, waiting - waiting // 2, start=100_000, queue=GPU)
    for tid in add_tasks(store, computing, start=200_000):
        store.create_replicate(tid, WORKER_A, {})
        store.transition_replicate(tid, WORKER_A, ReplicateStatus.STARTING)
    store.workers.insert_one(
        {"address": WORKER_A, "status": "ALIVE", "capabilities": ["standard"], "lastSeen": None}
    )


def _second_pass_cost(size: int) -> tuple[Counter[str], Counter[str]]:
    """Store calls and chain reads of a reconcile pass over ``size`` running tasks (half
    waiting for a worker on two queues, half computing), once the first pass settled them."""
    chain = FakeChain()
    store = Store(mongomock.MongoClient()[f"workerpool-cost-{size}"])
    store.ensure_indexes()
    settings = Settings(pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL)
    wallet = type("FakeWallet", (), {"address": POOL, "client": chain})()
    scheduler = Scheduler(settings, store, chain, wallet, FakeCelery(), None)  # type: ignore[arg-type]
    make_running_pool(store, waiting=size // 2, computing=size - size // 2)
    scheduler.lifecycle.reconcile(scheduler_report())  # first pass: waiting reasons written
    gpu_task = store.task(taskid(100_000))
    assert gpu_task is not None
    assert gpu_task["waitingReason"] == f"waiting: no live worker serves {GPU}"
    assert store.task(taskid(0)).get("waitingReason", "") == ""  # type: ignore[union-attr]
    chain.reads.clear()
    return reconcile_cost(scheduler, store), chain.reads


def test_a_reconcile_pass_costs_the_same_store_queries_for_4_or_60_running_tasks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_mod, "IN_BATCH", 25)  # (1,000 in production)
    # Given 4, then 60 running tasks; When the next tick reconciles them
    small, small_reads = _second_pass_cost(4)
    large, large_reads = _second_pass_cost(60)

    # Then the store is asked as often for 60 as for 4 (one query per pass, the live workers
    # counted once per queue), except the replicates: one $in query per IN_BATCH tasks
    assert small["replicates.find"] == 1 and large["replicates.find"] == 3
    assert large - Counter({"replicates.find": 3}) == small - Counter({"replicates.find": 1})
    assert large["workers.count_documents"] == 2
    assert large["tasks.find_one"] == 0 and large["replicates.find_one"] == 0
    assert large["tasks.find"] <= 10  # one per pass (detectors, contributing, reveal ...)
    # And no chain read per task (the block time only)
    assert small_reads == large_reads == Counter({"block_timestamp": 1})


def test_passes_over_every_running_task_read_a_projection_not_the_timeline(
    scheduler: Scheduler, store: Store
) -> None:
    make_running_pool(store, waiting=4, computing=4)
    read: list[dict[str, Any]] = []
    find = store.tasks.find

    def recording_find(query: Any, projection: Any = None, *a: Any, **kw: Any) -> Any:
        read.append(projection)
        return find(query, projection, *a, **kw)

    store.tasks.find = recording_find  # type: ignore[method-assign]
    scheduler.lifecycle.reconcile(scheduler_report())
    scheduler.requeue_lost_jobs(scheduler_report())
    assert read, "no task query seen"
    for projection in read:
        assert projection and projection.get("_id") == 0 and len(projection) > 1, projection
        assert "timeline" not in projection


def test_reconcile_still_moves_every_kind_of_contributing_task(
    scheduler: Scheduler, store: Store, chain: FakeChain
) -> None:
    # Given a task with a contribution in and consensus on chain, and one whose only
    # replicate failed with its worker (WORKER_LOST) while the chain is still ACTIVE
    consensus, lost = add_tasks(store, 2)
    store.create_replicate(consensus, WORKER_A, {})
    store.advance_replicate(consensus, WORKER_A, ReplicateStatus.CONTRIBUTED)
    chain.tasks[consensus] = chain_task(consensus, ChainTaskStatus.REVEALING, [WORKER_A])
    chain.contributions[(consensus, WORKER_A)] = contribution(ContributionStatus.CONTRIBUTED)
    store.create_replicate(lost, WORKER_B, {})
    store.transition_replicate(lost, WORKER_B, ReplicateStatus.WORKER_LOST)
    chain.tasks[lost] = chain_task(lost, ChainTaskStatus.ACTIVE, [])

    # When a tick reconciles them
    scheduler.lifecycle.reconcile(scheduler_report())

    # Then the first reached consensus and its winner is asked to reveal, the second got a
    # new replicate planned
    assert store.task(consensus)["status"] == "CONSENSUS_REACHED"  # type: ignore[index]
    sent = scheduler.celery.sent
    assert (REVEAL_TASK, [consensus], f"worker.{WORKER_A}") in sent
    assert store.task(lost)["replicatesNeeded"] == 2  # type: ignore[index]


def test_contribution_deadlines_have_an_index(store: Store) -> None:
    keys = [list(spec["key"]) for spec in store.tasks.index_information().values()]
    assert [("status", 1), ("contributionDeadline", 1)] in keys


# ---- hot spot 8: chain state read once -------------------------------------------------------
def test_consensus_reads_viewtask_once_and_asks_every_winner(
    scheduler: Scheduler, store: Store, chain: FakeChain
) -> None:
    # Given a trust-3 task where two workers agree and a third disagrees
    (tid,) = add_tasks(store, 1)
    for worker in (WORKER_A, WORKER_B, "0x" + "cc" * 20):
        store.create_replicate(tid, worker, {})
        store.advance_replicate(tid, worker, ReplicateStatus.CONTRIBUTED)
    chain.tasks[tid] = chain_task(
        tid, ChainTaskStatus.REVEALING, [WORKER_A, WORKER_B, "0x" + "cc" * 20], winner_counter=2
    )
    chain.contributions[(tid, WORKER_A)] = contribution(ContributionStatus.CONTRIBUTED)
    chain.contributions[(tid, WORKER_B)] = contribution(ContributionStatus.CONTRIBUTED)
    chain.contributions[(tid, "0x" + "cc" * 20)] = contribution(
        ContributionStatus.CONTRIBUTED, OTHER_HASH
    )

    # When the scheduler checks consensus
    assert scheduler.lifecycle.check_consensus(tid)

    # Then viewTask was read once (not again by request_reveals) and both winners are asked
    assert chain.reads["view_task"] == 1
    assert chain.reads["view_contribution"] == 3
    reveals = [args[0] for name, args, _ in scheduler.celery.sent if name == REVEAL_TASK]
    assert reveals == [tid, tid]

    # And a later tick does not read the contributions of winners already asked again
    chain.reads.clear()
    scheduler.lifecycle.request_reveals(tid)
    assert chain.reads["view_contribution"] == 1  # the loser only: it was never asked


def _event_log(name: str, worker: str, tid: str, emitter: str = POOL) -> dict[str, Any]:
    topic = keccak(text=f"{name}(address,bytes32)")
    return {
        "address": emitter,
        "topics": [topic, bytes(12) + bytes.fromhex(worker[2:]), bytes.fromhex(tid[2:])],
        "data": b"",
    }


def _uploaded_task(store: Store, chain: FakeChain) -> str:
    (tid,) = add_tasks(store, 1)
    for worker in (WORKER_A, WORKER_B):
        store.create_replicate(tid, worker, {})
        store.advance_replicate(tid, worker, ReplicateStatus.CONTRIBUTED)
    store.advance_replicate(tid, WORKER_A, ReplicateStatus.RESULT_UPLOADED)
    for status in ("CONSENSUS_REACHED", "AT_LEAST_ONE_REVEALED", "RESULT_UPLOADING"):
        store.transition_task(tid, TaskStatus(status))
    store.transition_task(tid, TaskStatus.RESULT_UPLOADED, extra={"resultLink": "/ipfs/x"})
    chain.tasks[tid] = chain_task(
        tid, ChainTaskStatus.REVEALING, [WORKER_A, WORKER_B], winner_counter=2, reveal_counter=1,
        reveal_deadline=NOW - 1,
    )  # fmt: skip
    return tid


@pytest.mark.parametrize("events", [True, False])
def test_finalize_reads_the_chain_once_and_records_who_was_proved(
    scheduler: Scheduler,
    store: Store,
    chain: FakeChain,
    monkeypatch: pytest.MonkeyPatch,
    events: bool,
) -> None:
    # Given a task whose result is uploaded; A revealed, B did not before the deadline
    tid = _uploaded_task(store, chain)
    store.workers.insert_many([{"address": WORKER_A}, {"address": WORKER_B}])
    chain.contributions[(tid, WORKER_A)] = contribution(ContributionStatus.PROVED)
    chain.contributions[(tid, WORKER_B)] = contribution(ContributionStatus.CONTRIBUTED)
    logs = (
        [
            _event_log("AccurateContribution", WORKER_B, tid, emitter="0x" + "99" * 20),
            _event_log("AccurateContribution", WORKER_A, tid),
            _event_log("FaultyContribution", WORKER_B, tid),
        ]
        if events
        else []
    )  # (the first: the same event emitted by another contract, ignored)
    receipt = Receipt(tx_hash="0x" + "ab" * 32, block_number=1, gas_used=1, status=1, logs=logs)
    finalize: Callable[..., Receipt] = lambda *a, **kw: receipt  # noqa: E731
    monkeypatch.setattr(lifecycle_mod.actions, "finalize", finalize)

    # When it is finalized
    assert scheduler.lifecycle.finalize(tid)

    # Then viewTask was read once; the verdicts come from the receipt's events (or, without
    # them, from one viewContribution per contributor)
    assert chain.reads["view_task"] == 1
    assert chain.reads["view_contribution"] == (0 if events else 2)
    assert store.task(tid)["status"] == "COMPLETED"  # type: ignore[index]
    assert store.replicate(tid, WORKER_A)["contribution"] == "PROVED"  # type: ignore[index]
    assert store.replicate(tid, WORKER_B)["contribution"] == "REJECTED"  # type: ignore[index]
    accepted = {
        w["address"]: (w.get("accepted", 0), w.get("rejected", 0))
        for w in store.workers.find({}, {"_id": 0})
    }
    assert accepted == {WORKER_A: (1, 0), WORKER_B: (0, 1)}
    assert store.replicate(tid, WORKER_B)["status"] == "ABORTED"  # type: ignore[index]


# ---- the safety-net passes: the chain once per task per CHAIN_RECHECK -----------------------
def test_ticks_ask_the_chain_about_a_waiting_task_once_per_recheck_period_not_every_tick(
    scheduler: Scheduler, store: Store, chain: FakeChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 20 trust-2 tasks with one contribution in and no consensus yet on chain, and 20
    # tasks past consensus whose winner was asked (its reveal deadline ahead)
    waiting = add_tasks(store, 20)
    for tid in waiting:
        store.tasks.update_one({"chainTaskId": tid}, {"$set": {"replicatesNeeded": 2}})
        store.create_replicate(tid, WORKER_A, {})
        store.advance_replicate(tid, WORKER_A, ReplicateStatus.CONTRIBUTED)
        store.create_replicate(tid, WORKER_B, {})
        store.advance_replicate(tid, WORKER_B, ReplicateStatus.COMPUTING)
        chain.tasks[tid] = chain_task(tid, ChainTaskStatus.ACTIVE, [WORKER_A])
    revealing = add_tasks(store, 20, start=1_000)
    for tid in revealing:
        store.create_replicate(tid, WORKER_A, {})
        store.advance_replicate(tid, WORKER_A, ReplicateStatus.CONTRIBUTED)
        chain.tasks[tid] = chain_task(tid, ChainTaskStatus.REVEALING, [WORKER_A])
        chain.contributions[(tid, WORKER_A)] = contribution(ContributionStatus.CONTRIBUTED)
        assert scheduler.lifecycle.check_consensus(tid)  # the report's path: winner asked
    chain.reads.clear()
    # When ticks follow one another (the first is the safety net's look at the waiting ones)
    scheduler.lifecycle.reconcile(scheduler_report())
    assert chain.reads["view_task"] == 20
    chain.reads.clear()
    for _ in range(3):
        scheduler.lifecycle.reconcile(scheduler_report())
    # Then they read no task on chain: only the chain time, once per tick
    assert chain.reads == Counter({"block_timestamp": 3})
    # And once CHAIN_RECHECK has passed, each task is looked at once more
    later = lifecycle_mod.utcnow() + dt.timedelta(seconds=lifecycle_mod.CHAIN_RECHECK + 1)
    monkeypatch.setattr(lifecycle_mod, "utcnow", lambda: later)
    scheduler.lifecycle.reconcile(scheduler_report())
    assert chain.reads["view_task"] == 40
