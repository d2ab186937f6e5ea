"""What the scheduler's passes cost, on fakes of the chain and Celery and the mongomock store:
a tick's work follows what changed, not what exists (a tick with nothing changed reads no
task at 10,000 running tasks; a report marks the one task the next tick looks at; the safety
net looks at a bounded slice per tick, every task in turn), and chain state read once is
passed along instead of read again (docs/performance.md, hot spots 7, 8 and 18)."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import fakeredis
import pytest
from eth_utils import keccak

from poco.chain import Receipt
from poco.types import ChainTaskStatus, ContributionStatus
from pool.clock import utcnow
from pool.messages import (
    ABORT,
    REPLICATE_QUEUES,
    REVEAL,
    RUN_REPLICATE,
    Messenger,
    ReplicateReport,
)
from pool.settings import Settings
from pool.states import ReplicateStatus, TaskStatus
from pool.store import Store
from scheduler import finalize as finalize_mod
from scheduler import fleet as fleet_mod
from scheduler import planning as planning_mod
from scheduler import reconcile as reconcile_mod
from scheduler.context import SchedulerContext, TickReport
from scheduler.service import Scheduler
from testing import indexed_mongomock
from testing.celery import FakeCelery, Sent
from testing.chain import FakeChain, FakeWallet, chain_task, contribution
from testing.store import COLLECTIONS, count_calls, memory_store

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


# ---- the tick's cost follows what changed, not what exists (issue 21) --------------------
@pytest.fixture
def indexed() -> Iterator[None]:
    """mongomock with the store's indexes (as ops/bench measures it): building 10,000 tasks
    on plain mongomock takes minutes (it scans the collection for every unique key)."""
    indexed_mongomock.install()
    try:
        yield
    finally:
        indexed_mongomock.uninstall()


class Clock:
    """The reconciler's wall clock, stopped at the time it is made, moved by the test."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> dt.datetime:
        return self.now

    def forward(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


def settled_pool(size: int) -> tuple[Scheduler, Store, FakeChain, FakeCelery]:
    """``size`` tasks through a first tick of the real scheduler: a quarter waiting on the
    standard queue, a quarter on the gpu queue (nobody serves it), half with a replicate of
    the one live standard worker under way; all planned (RUNNING, their jobs sent)."""
    chain = FakeChain(now=NOW, hub=POOL)
    store = memory_store(f"workerpool-tick-{size}")
    celery = FakeCelery()
    scheduler = make_scheduler(store, chain, celery)
    quarter = size // 4
    add_tasks(store, quarter, start=0, status="INITIALIZED")
    add_tasks(store, quarter, start=100_000, queue=GPU, status="INITIALIZED")
    computing = add_tasks(store, size - 2 * quarter, start=200_000, status="INITIALIZED")
    store.replicates.insert_many(
        [
            {"chainTaskId": tid, "worker": WORKER_A, "status": "STARTING", "updatedAt": None}
            for tid in computing
        ]
    )
    store.workers.insert_one(
        {"address": WORKER_A, "status": "ALIVE", "capabilities": ["standard"], "lastSeen": None}
    )
    store.tasks.update_many({"chainTaskId": {"$in": computing}}, {"$set": {"replicatesGranted": 1}})
    first = scheduler.tick()
    assert first.jobs_enqueued == size and not first.errors
    return scheduler, store, chain, celery


def tick_cost(
    scheduler: Scheduler, store: Store, chain: FakeChain
) -> tuple[Counter[str], Counter[str]]:
    """The store calls (and documents read) and chain reads of one full tick."""
    calls = count_calls(store, docs=True)
    chain.calls.clear()
    report = scheduler.tick()
    assert not report.errors, report.errors
    for name in COLLECTIONS:  # counting stops
        setattr(store, name, getattr(store, name)._inner)
    return calls, Counter(chain.calls)


def docs_read(calls: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in calls.items() if k.endswith("docs_read")}


def test_a_tick_at_10000_running_tasks_with_nothing_changed_costs_what_it_costs_at_1000(
    indexed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    costs = {}
    # (the progress bounds' pass runs at every tick, not once per STALL_CHECK: it is counted)
    monkeypatch.setattr(fleet_mod, "STALL_CHECK", 0.0)
    for size in (1_000, 10_000):
        # Given running tasks a tick has planned, and nothing happening since
        scheduler, store, chain, _ = settled_pool(size)
        gpu_task = store.task(taskid(100_000))
        assert gpu_task is not None
        assert gpu_task["waitingReason"] == f"waiting: no live worker serves {GPU}"
        assert store.task(taskid(0))["waitingReason"] == ""  # type: ignore[index]
        # When the next tick runs
        costs[size] = tick_cost(scheduler, store, chain)

    # Then it asks the store and the chain exactly as much at 10,000 tasks as at 1,000: the
    # live workers, the listener's cursor, the chain time, and the next slice of the safety
    # net (REVIEW_SLICE tasks and their replicates, however many tasks are in flight)
    (small, small_chain), (large, large_chain) = costs[1_000], costs[10_000]
    assert large == small, large - small
    slice_ = reconcile_mod.REVIEW_SLICE
    assert large["tasks.docs_read"] == slice_
    assert large["replicates.docs_read"] <= slice_
    assert sum(docs_read(large).values()) <= 2 * slice_ + 4, docs_read(large)
    assert sum(v for k, v in large.items() if not k.endswith("docs_read")) <= 40, large
    assert large_chain == small_chain
    assert large_chain["viewTask"] == 0 and large_chain["viewContribution"] == 0


def test_the_safety_net_looks_at_every_task_once_per_round_and_a_round_per_recheck_period(
    indexed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(reconcile_mod, "utcnow", clock)
    monkeypatch.setattr(reconcile_mod, "REVIEW_SLICE", 2_500)
    looked: list[list[str]] = []

    def spy(scheduler: Scheduler) -> None:
        look = scheduler.reconciler._look

        def recording(tasks: list[dict[str, Any]], report: TickReport) -> dict[str, Any]:
            looked[-1].extend(t["chainTaskId"] for t in tasks)
            return look(tasks, report)

        monkeypatch.setattr(scheduler.reconciler, "_look", recording)

    # Given 10,000 running tasks (the first tick looked at the first slice)
    scheduler, _, _, _ = settled_pool(10_000)
    spy(scheduler)
    # When ticks follow one another within CHAIN_RECHECK
    for _ in range(5):
        looked.append([])
        clock.forward(1)
        scheduler.tick()
    # Then each looks at the next slice by task id until the round is over, then none
    assert [len(ids) for ids in looked] == [2_500, 2_500, 2_500, 0, 0]
    first_round = [i for ids in looked for i in ids]
    assert len(set(first_round)) == len(first_round) == 7_500  # (+ the first tick's 2,500)
    # And once CHAIN_RECHECK has passed since the round started, the next round starts
    looked.append([])
    clock.forward(reconcile_mod.CHAIN_RECHECK)
    scheduler.tick()
    assert len(looked[-1]) == 2_500 and set(looked[-1]).isdisjoint(first_round)


def test_a_report_marks_its_task_and_the_next_tick_looks_at_that_task_only(
    indexed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (the safety net's round over the 10,000 tasks is over: the first tick looked at all)
    monkeypatch.setattr(reconcile_mod, "REVIEW_SLICE", 20_000)
    monkeypatch.setattr(reconcile_mod, "utcnow", Clock())
    scheduler, store, chain, celery = settled_pool(10_000)
    # Given one computing task whose replicate the worker gave up (an engine failure)
    tid = taskid(200_000 + 7)
    chain.tasks[tid] = task_on_chain(tid, ChainTaskStatus.ACTIVE, [])
    scheduler.reports.apply(
        ReplicateReport(tid, WORKER_A, ReplicateStatus.ABORTED, reason="engine failed")
    )
    assert store.task(tid)["reviewAt"] is not None  # type: ignore[index]
    monkeypatch.setattr(reconcile_mod, "utcnow", Clock())  # (its mark is due)
    sent = len(celery.messages)
    # When the next tick runs
    calls, chain_calls = tick_cost(scheduler, store, chain)
    # Then it looked at that task alone, planned another replicate for it, and left no mark
    assert calls["tasks.docs_read"] <= 3, docs_read(calls)
    assert calls["replicates.docs_read"] <= 2, docs_read(calls)
    assert chain_calls["viewTask"] == 1
    assert [m.args[0]["taskid"] for m in list(celery.messages)[sent:]] == [tid]
    doc = store.task(tid)
    assert doc is not None and doc["replicatesNeeded"] == 2 and "reviewAt" not in doc


def test_the_progress_bounds_read_the_replicates_that_changed_or_ran_out_not_all(
    indexed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 10,000 running tasks, 5,000 with a replicate that started 400 s ago (within its
    # bound, timeref + 3 x grace) and was not looked at since
    scheduler, store, chain, celery = settled_pool(10_000)
    fleet = scheduler.fleet
    clock = Clock()
    monkeypatch.setattr(fleet_mod, "utcnow", clock)
    started = clock.now - dt.timedelta(seconds=400)
    store.replicates.update_many({}, {"$set": {"updatedAt": started, "stallAt": started}})

    def stall_pass() -> tuple[int, Counter[str]]:
        calls = count_calls(store, docs=True)
        try:
            return fleet.detect_stalled(force=True), calls
        finally:
            for name in COLLECTIONS:
                setattr(store, name, getattr(store, name)._inner)

    # When the bounds are looked at: each is read once (with its task), none stalled
    found, calls = stall_pass()
    assert found == 0 and calls["replicates.docs_read"] == 5_000, calls
    # And when they are looked at again with nothing changed
    found, calls = stall_pass()
    # Then no replicate and no task is read (one index range, empty)
    assert found == 0 and sum(docs_read(calls).values()) == 0, calls
    # When one replicate reports COMPUTING
    tid = taskid(200_000 + 3)
    chain.tasks[tid] = task_on_chain(tid, ChainTaskStatus.ACTIVE, [])
    scheduler.reports.apply(ReplicateReport(tid, WORKER_A, ReplicateStatus.COMPUTING))
    clock.now = utcnow() + dt.timedelta(seconds=1)
    found, calls = stall_pass()
    # Then the next pass reads that replicate and its task alone, and moves its mark to when
    # its bound (timeref + grace) runs out
    assert found == 0
    assert calls["replicates.docs_read"] == 1 and calls["tasks.docs_read"] == 1, calls
    rep = store.replicate(tid, WORKER_A) or {}
    grace = scheduler.ctx.settings.progress_grace
    assert rep["stallAt"] == rep["updatedAt"] + dt.timedelta(seconds=300 + grace)
    # When that time has passed (and not the others' bound)
    clock.now = rep["stallAt"] + dt.timedelta(seconds=1)
    sent = len(celery.messages)
    found, calls = stall_pass()
    # Then that replicate alone is found stalled: WORKER_LOST, its node told to abort, the
    # task planned again; the others were not read
    assert found == 1 and calls["replicates.docs_read"] <= 3, calls
    assert (store.replicate(tid, WORKER_A) or {})["status"] == "WORKER_LOST"
    assert [(m.name, m.args[0]["taskid"]) for m in list(celery.messages)[sent:]] == [
        (ABORT.name, tid),
        (RUN_REPLICATE.name, tid),
    ]
    assert store.replicates.count_documents({"status": "STARTING"}) == 4_999


def test_a_queue_emptied_by_busy_workers_costs_each_task_one_look_for_lost_jobs(
    indexed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planning_mod, "REQUEUE_PER_TICK", 1_000)
    # Given 2,000 running tasks whose jobs every worker took (the queue is empty in Redis), past
    # the grace of the lost-jobs pass, and 3 tasks whose jobs Redis lost
    chain = FakeChain(now=NOW, hub=POOL)
    store = memory_store("workerpool-requeue")
    celery = FakeCelery()
    settings = Settings(pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL)
    wallet = FakeWallet(chain)
    redis = fakeredis.FakeRedis()
    ctx = SchedulerContext(settings, store, chain, wallet, Messenger(celery), redis)  # type: ignore[arg-type]
    scheduler = Scheduler(ctx)
    taken = add_tasks(store, 2_000)
    lost = add_tasks(store, 3, start=50_000)
    store.tasks.update_many({}, {"$set": {"enqueuedAt": 0.0}})
    store.tasks.update_many({"chainTaskId": {"$in": lost}}, {"$set": {"replicatesGranted": 0}})
    # When the pass runs tick after tick (at most REQUEUE_PER_TICK tasks per queue each)
    calls = count_calls(store, docs=True)
    added = [scheduler.planner.requeue_lost_jobs(TickReport()) for _ in range(4)]
    # Then the owed jobs are sent again once, each task owed nothing is read once and leaves
    # the pass, and the last pass reads nothing
    assert sum(added) == 3
    assert sorted(m.args[0]["taskid"] for m in celery.messages) == sorted(lost)
    assert calls["tasks.docs_read"] == len(taken) + len(lost)
    calls.clear()
    assert scheduler.planner.requeue_lost_jobs(TickReport()) == 0
    assert calls["tasks.docs_read"] == 0


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
