"""Failures the way iexec-core handles them, on the scheduler's side, on the fakes of
``testing/`` (the chain, Celery) and the mongomock store: a node's own failure planned on
another node and counted towards pausing it, an error result counted like any result, the
abort told to the nodes whose replicate is no longer needed, progress bounds, authorization
requests that expire, and the one callback-data parser at finalize."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from api.queries import worker_view
from poco.proofs import recover_abort_signer
from poco.types import ChainTaskStatus, ContributionStatus
from pool.clock import utcnow
from pool.messages import ABORT, RUN_REPLICATE, AuthorizeRequest, Messenger, ReplicateReport
from pool.settings import Settings
from pool.states import ReplicateStatus, ReplicateStatusCause, TaskStatus
from pool.store import Store
from scheduler.context import SchedulerContext, TickReport
from scheduler.fleet import progress_bound
from scheduler.service import Scheduler
from testing.celery import FakeCelery
from testing.chain import FakeChain, FakeWallet, chain_task, contribution
from testing.store import memory_store

R = ReplicateStatus
Cause = ReplicateStatusCause
POOL = "0x" + "11" * 20
A, B, C = ("0x" + c * 20 for c in ("aa", "bb", "cc"))
TASK = "0x" + "0a" * 32
DEAL = "0x" + "de" * 32
NOW = 1_000_000
CONSENSUS = "0x" + "c0" * 32
LINK = '{ "storage": "ipfs", "location": "/ipfs/QmYnLRMJpuWMYdor2GYo5M4NZCPoEpVaXJeS56aPz77hdc" }'


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain(now=NOW, hub=POOL)


@pytest.fixture
def store() -> Store:
    return memory_store("workerpool-failures")


@pytest.fixture
def celery() -> FakeCelery:
    return FakeCelery()


def make(store: Store, chain: FakeChain, celery: FakeCelery, **kw: Any) -> Scheduler:
    settings = Settings(pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL, **kw)
    ctx = SchedulerContext(settings, store, chain, FakeWallet(chain), Messenger(celery))  # type: ignore[arg-type]
    return Scheduler(ctx)


@pytest.fixture
def scheduler(store: Store, chain: FakeChain, celery: FakeCelery) -> Scheduler:
    return make(store, chain, celery, worker_max_failures=2, worker_pause=600)


def add_task(store: Store, chain: FakeChain, trust: int = 1, granted: int = 1) -> None:
    store.save_deal(
        {"chainDealId": DEAL},
        [
            {
                "chainTaskId": TASK,
                "chainDealId": DEAL,
                "index": 0,
                "status": "RUNNING",
                "trust": trust,
                "queue": "replicates.standard",
                "timeref": 300,
                "contributionDeadline": NOW + 1000,
                "finalDeadline": NOW + 3000,
                "jobsQueued": granted,
                "replicatesNeeded": granted,
                "replicatesGranted": granted,
            }
        ],
    )
    chain.tasks[TASK] = chain_task(
        TASK,
        ChainTaskStatus.ACTIVE,
        dealid=DEAL,
        timeref=300,
        contribution_deadline=NOW + 1000,
        final_deadline=NOW + 3000,
    )


def worker_at(store: Store, worker: str, status: ReplicateStatus) -> None:
    store.create_replicate(TASK, worker, {})
    store.advance_replicate(TASK, worker, status)


def report(scheduler: Scheduler, worker: str, status: ReplicateStatus, **fields: Any) -> None:
    scheduler.reports.apply(ReplicateReport(TASK, worker, status, **fields))


def aborts(celery: FakeCelery) -> list[tuple[str, dict[str, Any]]]:
    return [(m.queue, m.args[0]) for m in celery.of(ABORT.name)]


def heartbeat(store: Store, worker: str) -> None:
    store.record_heartbeat(worker, {"name": worker[:6], "capabilities": ["standard"], "slots": 2})


# ---- the node's own failures ------------------------------------------------------------------
def test_a_node_side_failure_is_planned_elsewhere_and_pauses_the_node_after_the_count(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    add_task(store, chain)
    heartbeat(store, A)
    worker_at(store, A, R.APP_DOWNLOADING)
    # When A reports that its registry rate-limits it
    report(
        scheduler,
        A,
        R.ABORTED,
        reason="app image: toomanyrequests",
        cause=Cause.APP_IMAGE_DOWNLOAD_FAILED,
        node_fault=True,
    )
    # Then the task is planned again at once, the reason in its timeline
    task = store.task(TASK) or {}
    assert task["replicatesNeeded"] == 2 and len(celery.of(RUN_REPLICATE.name)) == 1
    assert "failed on its side: app image: toomanyrequests" in task["timeline"][-1]["note"]
    # And A counts one failure: not paused yet
    assert (store.worker(A) or {})["consecutiveFailures"] == 1
    assert scheduler.fleet.paused_until(store.worker(A) or {}) is None
    # When A fails on its side a second time, on another task (WORKERPOOL_WORKER_MAX_FAILURES=2)
    report_other_task_failure(scheduler, store, A)
    # Then A is paused: refused work, shown PAUSED, back after WORKERPOOL_WORKER_PAUSE
    until = scheduler.fleet.paused_until(store.worker(A) or {})
    assert until is not None
    refused = scheduler.authorizer.authorize(AuthorizeRequest(TASK, A))
    assert not refused.granted and refused.requeue and "paused" in refused.reason
    doc = store.worker(A) or {}
    assert worker_view(doc, 60, utcnow())["status"] == "PAUSED"
    assert worker_view(doc, 1e9, until + dt.timedelta(seconds=1))["status"] == "ALIVE"


def report_other_task_failure(scheduler: Scheduler, store: Store, worker: str) -> None:
    """``worker`` fails on its side on another task."""
    other = "0x" + "0b" * 32
    store.save_deal(
        {"chainDealId": DEAL},
        [{"chainTaskId": other, "chainDealId": DEAL, "index": 1, "status": "RUNNING"}],
    )
    store.create_replicate(other, worker, {})
    scheduler.reports.apply(
        ReplicateReport(other, worker, R.ABORTED, reason="disk full", node_fault=True)
    )


def test_failures_of_the_app_or_its_inputs_are_not_the_nodes(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    add_task(store, chain)
    heartbeat(store, A)
    worker_at(store, A, R.APP_DOWNLOADING)
    # When A reports an input file that answers 404: an error result is on its way
    report(
        scheduler,
        A,
        R.DATA_DOWNLOAD_FAILED,
        cause=Cause.INPUT_FILES_DOWNLOAD_FAILED,
        reason="HTTP 404",
        note="error result",
    )
    # Then nothing is planned again (the replicate is under way), A is not blamed
    scheduler.reconciler.reconcile(TickReport())
    assert celery.of(RUN_REPLICATE.name) == []
    assert (store.worker(A) or {}).get("consecutiveFailures", 0) == 0
    # And the error result is contributed like any result
    report(scheduler, A, R.CONTRIBUTING)
    rep = store.replicate(TASK, A) or {}
    statuses = [e["status"] for e in rep["timeline"]]
    assert statuses[-2:] == ["DATA_DOWNLOAD_FAILED", "CONTRIBUTING"]
    assert rep["timeline"][-2]["cause"] == "INPUT_FILES_DOWNLOAD_FAILED"


def test_a_refused_request_is_not_planned_again(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    add_task(store, chain)
    worker_at(store, A, R.STARTING)
    report(scheduler, A, R.START_FAILED, cause=Cause.TASK_DESCRIPTION_INVALID)
    scheduler.reconciler.reconcile(TickReport())
    assert celery.of(RUN_REPLICATE.name) == [] and (store.task(TASK) or {})["replicatesNeeded"] == 1


# ---- abort --------------------------------------------------------------------------------------
def test_consensus_aborts_the_replicates_that_did_not_contribute_on_their_nodes(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    # Given a trust-2 task with three replicates: A contributed, B computes, C is lost
    add_task(store, chain, trust=2, granted=3)
    worker_at(store, A, R.CONTRIBUTING)
    worker_at(store, B, R.COMPUTING)
    worker_at(store, C, R.STARTING)
    store.transition_replicate(TASK, C, R.WORKER_LOST)
    chain.tasks[TASK] = chain_task(
        TASK,
        ChainTaskStatus.REVEALING,
        [A],
        consensus_value=CONSENSUS,
        winner_counter=1,
        reveal_deadline=NOW + 600,
        final_deadline=NOW + 3000,
    )
    chain.contributions[(TASK, A.lower())] = contribution(ContributionStatus.CONTRIBUTED, CONSENSUS)
    # When A's contribution is reported and consensus is noticed
    report(scheduler, A, R.CONTRIBUTED)
    # Then B and C are told on their own queues to abort, and recorded ABORTED with the cause
    told = aborts(celery)
    assert sorted(q for q, _ in told) == [f"worker.{B}", f"worker.{C}"]
    assert {p["cause"] for _, p in told} == {"CONSENSUS_REACHED"}
    # signed with the scheduler's key: the nodes obey the pool owner only
    owner = scheduler.ctx.wallet.address
    for queue, p in told:
        worker = queue.removeprefix("worker.")
        signer = recover_abort_signer(p["signature"], worker, TASK, p["cause"], p["reason"])
        assert signer == owner
    for worker in (B, C):
        rep = store.replicate(TASK, worker) or {}
        assert rep["status"] == "ABORTED" and rep["timeline"][-1]["cause"] == "CONSENSUS_REACHED"
    assert (store.replicate(TASK, A) or {})["status"] == "CONTRIBUTED"


def test_the_contribution_deadline_aborts_every_replicate_under_way(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    add_task(store, chain, granted=2)
    worker_at(store, A, R.COMPUTING)
    worker_at(store, B, R.COMPUTED)
    chain.now = NOW + 1001
    scheduler.consensus.contribution_timeouts(chain.now)
    assert (store.task(TASK) or {})["status"] == "CONTRIBUTION_TIMEOUT"
    assert sorted(p["cause"] + q for q, p in aborts(celery)) == [
        f"CONTRIBUTION_TIMEOUTworker.{A}",
        f"CONTRIBUTION_TIMEOUTworker.{B}",
    ]


def test_the_final_deadline_aborts_what_still_runs(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    add_task(store, chain)
    worker_at(store, A, R.COMPUTING)
    chain.now = NOW + 3001
    scheduler.finalizer.claim_expired(chain.now, TickReport())
    ((queue, payload),) = aborts(celery)
    assert queue == f"worker.{A}" and payload["cause"] == "UNKNOWN"
    assert "final deadline" in payload["reason"]
    assert chain.txs["claim"] == 1


# ---- progress bounds ----------------------------------------------------------------------------
def test_progress_bounds_per_status() -> None:
    assert progress_bound("CREATED", 300, 60) == 60
    assert progress_bound("APP_DOWNLOADING", 300, 60) == 300 + 180
    assert progress_bound("COMPUTING", 300, 60) == 360
    assert progress_bound("COMPUTED", 300, 60) == progress_bound("DATA_DOWNLOAD_FAILED", 300, 60)


def _age(store: Store, worker: str, seconds: float) -> None:
    """The replicate's last change was ``seconds`` ago (which set its stall mark then)."""
    then = utcnow() - dt.timedelta(seconds=seconds)
    store.replicates.update_one(
        {"chainTaskId": TASK, "worker": worker}, {"$set": {"updatedAt": then, "stallAt": then}}
    )


def test_a_replicate_that_stops_moving_is_lost_aborted_and_planned_again(
    store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    scheduler = make(store, chain, celery, progress_grace=60)
    add_task(store, chain, granted=2)
    # Given a grant its worker no longer waited for (CREATED), and a replicate computing
    # for less than its bound
    worker_at(store, A, R.CREATED)
    _age(store, A, 61)
    worker_at(store, B, R.COMPUTING)
    _age(store, B, 300)
    # When the bounds are looked at
    assert scheduler.fleet.detect_stalled(force=True) == 1
    # Then A is WORKER_LOST, told to abort, and the task planned again with the reason
    rep = store.replicate(TASK, A) or {}
    assert (
        rep["status"] == "WORKER_LOST" and "no progress from CREATED" in rep["timeline"][-1]["note"]
    )
    ((queue, payload),) = aborts(celery)
    assert queue == f"worker.{A}" and "bound 60 s" in payload["reason"]
    # (B is still computing: nothing is planned while it may contribute)
    assert (store.replicate(TASK, B) or {})["status"] == "COMPUTING"
    # When B stays COMPUTING past the time reference and the grace
    _age(store, B, 361)
    assert scheduler.fleet.detect_stalled(force=True) == 1
    task = store.task(TASK) or {}
    assert task["replicatesNeeded"] == 3 and len(celery.of(RUN_REPLICATE.name)) == 1
    assert "no progress from COMPUTING" in task["timeline"][-1]["note"]
    # And the pass is not repeated within STALL_CHECK
    assert scheduler.fleet.detect_stalled() == 0


def test_an_authorization_request_read_after_it_expired_is_refused(
    scheduler: Scheduler, store: Store, chain: FakeChain
) -> None:
    add_task(store, chain, granted=0)
    store.set_task_fields(TASK, {"replicatesNeeded": 1})
    heartbeat(store, A)
    late = scheduler.authorizer.authorize(AuthorizeRequest(TASK, A, expires_at=time.time() - 1))
    assert not late.granted and "expired" in late.reason and store.replicate(TASK, A) is None
    fresh = scheduler.authorizer.authorize(AuthorizeRequest(TASK, A, expires_at=time.time() + 30))
    assert fresh.granted


# ---- callback-data at finalize ------------------------------------------------------------------
@pytest.mark.parametrize(("callback", "sent"), [("0x123", b"\x01\x23"), ("", b"")])
def test_finalize_sends_the_callback_bytes_the_digest_was_made_of(
    scheduler: Scheduler, store: Store, chain: FakeChain, callback: str, sent: bytes
) -> None:
    add_task(store, chain)
    worker_at(store, A, R.REVEALED)
    for status in ("CONSENSUS_REACHED", "AT_LEAST_ONE_REVEALED", "RESULT_UPLOADING"):
        store.transition_task(TASK, TaskStatus(status))
    chain.tasks[TASK] = chain_task(
        TASK, ChainTaskStatus.REVEALING, [A], winner_counter=1, reveal_counter=1
    )
    chain.contributions[(TASK, A.lower())] = contribution(ContributionStatus.CONTRIBUTED)
    store.set_task_fields(TASK, {"uploader": A})
    scheduler.finalizer.uploaded(TASK, A, LINK, callback)
    assert chain.txs["finalize"] == 1 and chain.tasks[TASK].results_callback == sent
    assert (store.task(TASK) or {})["status"] == "COMPLETED"


def test_callback_data_that_is_not_hex_fails_finalize_with_the_reason(
    scheduler: Scheduler, store: Store, chain: FakeChain
) -> None:
    add_task(store, chain)
    for status in ("CONSENSUS_REACHED", "AT_LEAST_ONE_REVEALED", "RESULT_UPLOADING"):
        store.transition_task(TASK, TaskStatus(status))
    chain.tasks[TASK] = chain_task(
        TASK, ChainTaskStatus.REVEALING, [A], winner_counter=1, reveal_counter=1
    )
    store.set_task_fields(TASK, {"uploader": A})
    scheduler.finalizer.uploaded(TASK, A, LINK, "0xnothex")
    task = store.task(TASK) or {}
    assert chain.txs["finalize"] == 0 and task["status"] == "FINALIZE_FAILED"
    assert "not hexadecimal" in task["failureReason"]
