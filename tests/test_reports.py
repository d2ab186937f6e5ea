"""Worker reports applied by the scheduler, on the fakes of ``testing/``: the cases the
devnet tests reach only under load."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from poco.types import ChainTaskStatus, ContributionStatus
from pool.clock import utcnow
from pool.messages import REVEAL, UPLOAD, MessageError, Messenger, ReplicateReport
from pool.settings import Settings
from pool.states import ReplicateStatus, ReplicateStatusCause, TaskStatus
from pool.store import Store
from scheduler.context import SchedulerContext, TickReport
from scheduler.reports import NotYet
from scheduler.service import Scheduler
from testing.celery import FakeCelery
from testing.chain import FakeChain, FakeWallet, chain_task, contribution
from testing.store import memory_store

POOL = "0x" + "11" * 20
WORKER = "0x" + "aa" * 20
TASK = "0x" + "0a" * 32
NOW = 1_000_000
R = ReplicateStatus
LINK = '{ "storage": "ipfs", "location": "/ipfs/QmYnLRMJpuWMYdor2GYo5M4NZCPoEpVaXJeS56aPz77hdc" }'


@pytest.fixture
def chain() -> FakeChain:
    return FakeChain(now=NOW, hub=POOL)


@pytest.fixture
def store() -> Store:
    return memory_store("workerpool-reports")


@pytest.fixture
def celery() -> FakeCelery:
    return FakeCelery()


@pytest.fixture
def scheduler(store: Store, chain: FakeChain, celery: FakeCelery) -> Scheduler:
    settings = Settings(
        pool_address=POOL, chain_rpc_url="http://fake", hub_address=POOL, reveal_timeout_period=1
    )
    ctx = SchedulerContext(settings, store, chain, FakeWallet(chain), Messenger(celery))  # type: ignore[arg-type]
    return Scheduler(ctx)


def report(scheduler: Scheduler, status: ReplicateStatus, **fields: Any) -> None:
    scheduler.reports.apply(ReplicateReport(TASK, WORKER, status, **fields))


def _running_task(store: Store, replicate: ReplicateStatus) -> None:
    """A RUNNING trust-1 task with WORKER's replicate at ``replicate``."""
    store.save_deal(
        {"chainDealId": "0x" + "de" * 32},
        [
            {
                "chainTaskId": TASK,
                "chainDealId": "0x" + "de" * 32,
                "index": 0,
                "status": "RUNNING",
                "trust": 1,
                "queue": "replicates.standard",
                "timeref": 300,
                "contributionDeadline": NOW + 1000,
                "finalDeadline": NOW + 3000,
                "jobsQueued": 1,
                "replicatesNeeded": 1,
                "replicatesGranted": 1,
            }
        ],
    )
    store.create_replicate(TASK, WORKER, {})
    store.advance_replicate(TASK, WORKER, replicate)


def test_an_upload_reported_after_it_was_given_up_as_timed_out_is_finalized(
    scheduler: Scheduler,
    store: Store,
    chain: FakeChain,
    celery: FakeCelery,
) -> None:
    # Given a trust-1 task whose only winner revealed and was asked to upload
    _running_task(store, ReplicateStatus.CONTRIBUTED)
    chain.tasks[TASK] = chain_task(
        TASK, ChainTaskStatus.REVEALING, [WORKER], winner_counter=1, reveal_deadline=NOW + 600
    )
    chain.contributions[(TASK, WORKER)] = contribution(ContributionStatus.CONTRIBUTED)
    assert scheduler.consensus.check(TASK)
    assert [m.args[0]["taskid"] for m in celery.of(REVEAL.name)] == [TASK]
    chain.tasks[TASK] = chain_task(
        TASK, ChainTaskStatus.REVEALING, [WORKER], winner_counter=1, reveal_counter=1
    )
    chain.contributions[(TASK, WORKER)] = contribution(ContributionStatus.PROVED)
    report(scheduler, ReplicateStatus.REVEALED)
    assert store.task(TASK)["status"] == "RESULT_UPLOADING"  # type: ignore[index]
    assert len(celery.of(UPLOAD.name)) == 1
    # When the uploader stays silent past REVEAL_TIMEOUT_PERIOD (a busy or restarting node)
    store.set_task_fields(TASK, {"uploadRequestedAt": store.task(TASK)["createdAt"]})  # type: ignore[index]
    scheduler.finalizer.upload_timeouts()
    assert store.task(TASK)["status"] == "AT_LEAST_ONE_REVEALED"  # type: ignore[index]
    # And its upload is reported after all
    report(scheduler, ReplicateStatus.RESULT_UPLOADING)
    report(scheduler, ReplicateStatus.RESULT_UPLOADED, result_link=LINK, callback_data="")
    # Then the link is used: the task is finalized with it, not left waiting for an upload
    assert chain.txs["finalize"] == 1 and chain.tasks[TASK].results == LINK.encode()
    assert store.task(TASK)["status"] == str(TaskStatus.COMPLETED)  # type: ignore[index]
    assert store.task(TASK)["resultLink"] == LINK  # type: ignore[index]
    scheduler.reconciler.reconcile(TickReport())
    assert len(celery.of(UPLOAD.name)) == 1  # nobody asked to upload again


def _statuses(store: Store) -> list[str]:
    return [e["status"] for e in store.replicate(TASK, WORKER)["timeline"]]  # type: ignore[index]


def test_an_error_results_contributing_processed_before_its_failure_waits_for_it(
    scheduler: Scheduler, store: Store
) -> None:
    # Given a replicate COMPUTING whose app failed: the node reports COMPUTE_FAILED, then
    # CONTRIBUTING its error result, and the scheduler's threads take the second one first
    _running_task(store, ReplicateStatus.COMPUTING)
    contributing = ReplicateReport(TASK, WORKER, ReplicateStatus.CONTRIBUTING)
    # When the CONTRIBUTING is applied on its first try: it waits (asked again later)
    with pytest.raises(NotYet):
        scheduler.reports.apply(contributing, first_try=True)
    assert store.replicate(TASK, WORKER)["status"] == "COMPUTING"  # type: ignore[index]
    # Then the failure lands with its cause, and the CONTRIBUTING asked again follows it
    scheduler.reports.apply(
        ReplicateReport(
            TASK,
            WORKER,
            ReplicateStatus.COMPUTE_FAILED,
            reason="app exited with code 3",
            cause=ReplicateStatusCause.APP_COMPUTE_FAILED,
        ),
        first_try=True,
    )
    scheduler.reports.apply(contributing)
    assert _statuses(store)[-2:] == ["COMPUTE_FAILED", "CONTRIBUTING"]
    failed = store.replicate(TASK, WORKER)["timeline"][-2]  # type: ignore[index]
    assert failed["cause"] == "APP_COMPUTE_FAILED"


def test_a_report_whose_skipped_statuses_cannot_be_a_failure_is_applied_at_once(
    scheduler: Scheduler, store: Store
) -> None:
    _running_task(store, ReplicateStatus.COMPUTING)
    # a CONTRIBUTING asked again (not its first try) whose failure report never came: applied,
    # the statuses in between implied
    scheduler.reports.apply(
        ReplicateReport(TASK, WORKER, ReplicateStatus.CONTRIBUTING), first_try=False
    )
    assert _statuses(store)[-2:] == ["COMPUTED", "CONTRIBUTING"]
    # a COMPUTING before its APP_DOWNLOADING: no failure leads to COMPUTING, no wait
    store.create_replicate(TASK, "0x" + "bb" * 20, {})
    store.advance_replicate(TASK, "0x" + "bb" * 20, ReplicateStatus.STARTING)
    scheduler.reports.apply(
        ReplicateReport(TASK, "0x" + "bb" * 20, ReplicateStatus.COMPUTING), first_try=True
    )
    timeline = store.replicate(TASK, "0x" + "bb" * 20)["timeline"]  # type: ignore[index]
    assert [e["status"] for e in timeline][-2:] == ["APP_DOWNLOADING", "COMPUTING"]


def test_a_report_carrying_the_statuses_it_passed_records_them_at_their_time_in_one_write(
    scheduler: Scheduler, store: Store
) -> None:
    # Given a replicate at CREATED, and a node whose fast task went through STARTING,
    # APP_DOWNLOADING and COMPUTING before it computed (one report for the four)
    _running_task(store, ReplicateStatus.CREATED)
    hour_ago = utcnow() - dt.timedelta(hours=1)
    store.replicates.update_one({"chainTaskId": TASK}, {"$set": {"updatedAt": hour_ago}})
    start = time.time() - 3
    computed = ReplicateReport(
        TASK,
        WORKER,
        ReplicateStatus.COMPUTED,
        passed=(ReplicateStatus.STARTING, ReplicateStatus.APP_DOWNLOADING, R.COMPUTING),
        passed_at=(start, start + 1, start + 2),
    )
    writes = store.replicates.find_one_and_update
    calls: list[Any] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return writes(*args, **kwargs)

    store.replicates.find_one_and_update = counted  # type: ignore[method-assign]
    # When it is applied on its first try: no wait, since the node says what it went through
    scheduler.reports.apply(computed, first_try=True)
    # Then the timeline has the four, the passed ones at the node's times, in one write
    timeline = store.replicate(TASK, WORKER)["timeline"]  # type: ignore[index]
    assert [e["status"] for e in timeline][-4:] == [
        "STARTING",
        "APP_DOWNLOADING",
        "COMPUTING",
        "COMPUTED",
    ]
    times = [e["at"] for e in timeline[-4:]]
    assert times == sorted(times) and times[0] < times[1] < times[2]
    assert all("note" not in e for e in timeline[-4:-1])  # reported, not implied
    assert len(calls) == 1


def test_a_report_that_says_it_passed_the_status_a_failure_could_stand_for_does_not_wait(
    scheduler: Scheduler, store: Store
) -> None:
    # (without passed, this CONTRIBUTING waits once: the test above)
    _running_task(store, ReplicateStatus.COMPUTING)
    scheduler.reports.apply(
        ReplicateReport(
            TASK, WORKER, R.CONTRIBUTING, passed=(R.COMPUTED,), passed_at=(time.time(),)
        ),
        first_try=True,
    )
    assert _statuses(store)[-2:] == ["COMPUTED", "CONTRIBUTING"]


def test_passed_statuses_cannot_reorder_a_timeline_nor_date_it_ahead(
    scheduler: Scheduler, store: Store
) -> None:
    _running_task(store, ReplicateStatus.STARTING)
    now = time.time()
    # a node clock an hour ahead, and one a day behind the replicate's last change
    scheduler.reports.apply(
        ReplicateReport(
            TASK,
            WORKER,
            R.COMPUTED,
            passed=(R.APP_DOWNLOADING, R.COMPUTING),
            passed_at=(now - 86_400, now + 3_600),
        ),
        first_try=True,
    )
    timeline = store.replicate(TASK, WORKER)["timeline"]  # type: ignore[index]
    times = [e["at"] for e in timeline]
    assert times == sorted(times)
    assert timeline[-2]["at"] <= timeline[-1]["at"]


@pytest.mark.parametrize(
    "wire",
    [
        {"passed": ["STARTING"], "passed_at": []},  # a time missing
        {"passed": ["STARTING", "STARTING"], "passed_at": [1.0, 2.0]},  # twice
        {"passed": ["COMPUTED"], "passed_at": [1.0]},  # the status itself
        {"passed": ["NOT_A_STATUS"], "passed_at": [1.0]},
        {"passed": ["STARTING"], "passed_at": ["soon"]},
    ],
)
def test_a_report_whose_passed_statuses_do_not_hold_together_is_malformed(
    wire: dict[str, Any],
) -> None:
    body = {"taskid": TASK, "worker": WORKER, "status": "COMPUTED", **wire}
    with pytest.raises(MessageError):
        ReplicateReport.from_wire(body)


def test_a_reveal_reported_before_its_contribution_still_brings_the_task_to_consensus(
    scheduler: Scheduler, store: Store, chain: FakeChain, celery: FakeCelery
) -> None:
    # Given a node that contributed and, asked to reveal by someone on Redis before the
    # scheduler saw its contribution, revealed: consensus is on chain, the task RUNNING here
    _running_task(store, ReplicateStatus.COMPUTED)
    chain.tasks[TASK] = chain_task(
        TASK, ChainTaskStatus.REVEALING, [WORKER], winner_counter=1, reveal_deadline=NOW + 600
    )
    chain.contributions[(TASK, WORKER)] = contribution(ContributionStatus.CONTRIBUTED)
    # When its REVEALING report is applied before its CONTRIBUTED (which comes stale after)
    report(scheduler, R.REVEALING)
    report(scheduler, R.CONTRIBUTED)
    # Then the contribution's consequence was not lost: consensus recorded, reveal asked
    assert store.task(TASK)["status"] == str(TaskStatus.CONSENSUS_REACHED)  # type: ignore[index]
    assert [m.args[0]["taskid"] for m in celery.of(REVEAL.name)] == [TASK]
