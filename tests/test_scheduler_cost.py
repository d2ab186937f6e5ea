"""What the scheduler's passes cost, on fakes of the chain and Celery and the mongomock store:
a tick's store queries do not grow with the number of running tasks (one query per pass,
replicates read in ``$in`` batches, serving workers counted once per queue), and chain state
read once is passed along instead of read again (docs/performance.md, hot spots 7 and 8)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from eth_utils import keccak

from poco.chain import Receipt
from poco.types import ChainTaskStatus, ContributionStatus
from pool import store as store_mod
from pool.messages import REPLICATE_QUEUES, REVEAL, Messenger
from pool.settings import Settings
from pool.states import ReplicateStatus, TaskStatus
from pool.store import Store
from scheduler import finalize as finalize_mod
from scheduler import reconcile as reconcile_mod
from scheduler.context import SchedulerContext, TickReport
from scheduler.service import Scheduler
from testing.celery import FakeCelery, Sent
from testing.chain import FakeChain, FakeWallet, chain_task, contribution
from testing.store import count_calls, memory_store

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


def task_on_chain(tid: str, status: ChainTaskStatus, contributors: list[str], **kw: Any) -> Any:
    """A task on chain of the fake pool: deadlines around NOW, consensus on CONSENSUS."""
    fields: dict[str, Any] = {
        "dealid": "0x" + "de" * 32,
        "timeref": 300,
        "contribution_deadline": NOW + 1000,
        "reveal_deadline": NOW + 600,
        "final_deadline": NOW + 3000,
        "consensus_value": CONSENSUS,
        "winner_counter": len(contributors),
    }
    return chain_task(tid, status, contributors, **{**fields, **kw})


def contributed(status: ContributionStatus, result_hash: str = CONSENSUS) -> Any:
    return contribution(status, result_hash)


def make_scheduler(store: Store, chain: FakeChain, celery: FakeCelery) -> Scheduler:
    settings = Settings(pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL)
    ctx = SchedulerContext(settings, store, chain, FakeWallet(chain), Messenger(celery))  # type: ignore[arg-type]
    return Scheduler(ctx)


@pytest.fixture
def store() -> Store:
    return memory_store("workerpool-cost")


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain(now=NOW, hub=POOL)


@pytest.fixture
def celery() -> FakeCelery:
    return FakeCelery()


@pytest.fixture
def scheduler(store: Store, chain: FakeChain, celery: FakeCelery) -> Scheduler:
    return make_scheduler(store, chain, celery)


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
    calls = count_calls(store, docs=False)
    scheduler.reconciler.reconcile(scheduler_report())
    return calls


def scheduler_report() -> TickReport:
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
    chain = FakeChain(now=NOW, hub=POOL)
    store = memory_store(f"workerpool-cost-{size}")
    scheduler = make_scheduler(store, chain, FakeCelery())
    make_running_pool(store, waiting=size // 2, computing=size - size // 2)
    scheduler.reconciler.reconcile(scheduler_report())  # first pass: waiting reasons written
    gpu_task = store.task(taskid(100_000))
    assert gpu_task is not None
    assert gpu_task["waitingReason"] == f"waiting: no live worker serves {GPU}"
    assert store.task(taskid(0)).get("waitingReason", "") == ""  # type: ignore[union-attr]
    chain.calls.clear()
    return reconcile_cost(scheduler, store), chain.calls


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
    assert small_reads == large_reads == Counter({"eth_getBlockByNumber": 1})


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
    scheduler.reconciler.reconcile(scheduler_report())
    scheduler.planner.requeue_lost_jobs(scheduler_report())
    assert read, "no task query seen"
    for projection in read:
        assert projection and projection.get("_id") == 0 and len(projection) > 1, projection
        assert "timeline" not in projection


def test_reconcile_still_moves_every_kind_of_contributing_task(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    # Given a task with a contribution in and consensus on chain, and one whose only
    # replicate failed with its worker (WORKER_LOST) while the chain is still ACTIVE
    consensus, lost = add_tasks(store, 2)
    store.create_replicate(consensus, WORKER_A, {})
    store.advance_replicate(consensus, WORKER_A, ReplicateStatus.CONTRIBUTED)
    chain.tasks[consensus] = task_on_chain(consensus, ChainTaskStatus.REVEALING, [WORKER_A])
    chain.contributions[(consensus, WORKER_A)] = contributed(ContributionStatus.CONTRIBUTED)
    store.create_replicate(lost, WORKER_B, {})
    store.transition_replicate(lost, WORKER_B, ReplicateStatus.WORKER_LOST)
    chain.tasks[lost] = task_on_chain(lost, ChainTaskStatus.ACTIVE, [])

    # When a tick reconciles them
    scheduler.reconciler.reconcile(scheduler_report())

    # Then the first reached consensus and its winner is asked to reveal, the second got a
    # new replicate planned
    assert store.task(consensus)["status"] == "CONSENSUS_REACHED"  # type: ignore[index]
    assert Sent(REVEAL.name, [{"taskid": consensus}], f"worker.{WORKER_A}") in celery.messages
    assert store.task(lost)["replicatesNeeded"] == 2  # type: ignore[index]


def test_contribution_deadlines_have_an_index(store: Store) -> None:
    keys = [list(spec["key"]) for spec in store.tasks.index_information().values()]
    assert [("status", 1), ("contributionDeadline", 1)] in keys


# ---- hot spot 8: chain state read once -------------------------------------------------------
def test_consensus_reads_viewtask_once_and_asks_every_winner(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    # Given a trust-3 task where two workers agree and a third disagrees
    (tid,) = add_tasks(store, 1)
    for worker in (WORKER_A, WORKER_B, "0x" + "cc" * 20):
        store.create_replicate(tid, worker, {})
        store.advance_replicate(tid, worker, ReplicateStatus.CONTRIBUTED)
    chain.tasks[tid] = task_on_chain(
        tid, ChainTaskStatus.REVEALING, [WORKER_A, WORKER_B, "0x" + "cc" * 20], winner_counter=2
    )
    chain.contributions[(tid, WORKER_A)] = contributed(ContributionStatus.CONTRIBUTED)
    chain.contributions[(tid, WORKER_B)] = contributed(ContributionStatus.CONTRIBUTED)
    chain.contributions[(tid, "0x" + "cc" * 20)] = contribution(
        ContributionStatus.CONTRIBUTED, OTHER_HASH
    )

    # When the scheduler checks consensus
    assert scheduler.consensus.check(tid)

    # Then viewTask was read once (not again by request_reveals) and both winners are asked
    assert chain.calls["viewTask"] == 1
    assert chain.calls["viewContribution"] == 3
    reveals = [m.args[0]["taskid"] for m in celery.of(REVEAL.name)]
    assert reveals == [tid, tid]

    # And a later tick does not read the contributions of winners already asked again
    chain.calls.clear()
    scheduler.consensus.request_reveals(tid)
    assert chain.calls["viewContribution"] == 1  # the loser only: it was never asked


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
    chain.tasks[tid] = task_on_chain(
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
    chain.contributions[(tid, WORKER_A)] = contributed(ContributionStatus.PROVED)
    chain.contributions[(tid, WORKER_B)] = contributed(ContributionStatus.CONTRIBUTED)
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
    monkeypatch.setattr(finalize_mod.actions, "finalize", finalize)

    # When it is finalized
    assert scheduler.finalizer.finalize(tid)

    # Then viewTask was read once; the verdicts come from the receipt's events (or, without
    # them, from one viewContribution per contributor)
    assert chain.calls["viewTask"] == 1
    assert chain.calls["viewContribution"] == (0 if events else 2)
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
        chain.tasks[tid] = task_on_chain(tid, ChainTaskStatus.ACTIVE, [WORKER_A])
    revealing = add_tasks(store, 20, start=1_000)
    for tid in revealing:
        store.create_replicate(tid, WORKER_A, {})
        store.advance_replicate(tid, WORKER_A, ReplicateStatus.CONTRIBUTED)
        chain.tasks[tid] = task_on_chain(tid, ChainTaskStatus.REVEALING, [WORKER_A])
        chain.contributions[(tid, WORKER_A)] = contributed(ContributionStatus.CONTRIBUTED)
        assert scheduler.consensus.check(tid)  # the report's path: winner asked
    chain.calls.clear()
    # When ticks follow one another (the first is the safety net's look at the waiting ones)
    scheduler.reconciler.reconcile(scheduler_report())
    assert chain.calls["viewTask"] == 20
    chain.calls.clear()
    for _ in range(3):
        scheduler.reconciler.reconcile(scheduler_report())
    # Then they read no task on chain: only the chain time, once per tick
    assert chain.calls == Counter({"eth_getBlockByNumber": 3})
    # And once CHAIN_RECHECK has passed, each task is looked at once more
    later = reconcile_mod.utcnow() + dt.timedelta(seconds=reconcile_mod.CHAIN_RECHECK + 1)
    monkeypatch.setattr(reconcile_mod, "utcnow", lambda: later)
    scheduler.reconciler.reconcile(scheduler_report())
    assert chain.calls["viewTask"] == 40
