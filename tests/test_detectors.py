"""Deadline detectors on the real chain (anvil's clock moved forward): contribution timeout,
reopen after an unrevealed consensus, claims batched with claimArray."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle

from devnet.requester import match_deal
from poco import actions
from poco.chain import Wallet
from poco.types import ChainTaskStatus, ContributionStatus
from pool.clock import utcnow
from pool.messages import REPLICATE_QUEUES, Authorization, worker_queue
from pool.store import Store
from scheduler.reconcile import UNREPORTED_GRACE
from scheduler.service import Scheduler
from testing.workers import SigningWorker

pytestmark = pytest.mark.devnet

TIMEREF = 300  # category XS
DIGEST = "0x" + "7e" * 32


def _signing(scheduler: Scheduler, worker: Wallet) -> SigningWorker:
    return SigningWorker(worker.account.key, scheduler.ctx.domain)


def authorize(scheduler: Scheduler, taskid: str, worker: Wallet) -> Authorization:
    """The worker's signed heartbeat, then its signed request, through the inbox."""
    signing = _signing(scheduler, worker)
    scheduler.inbox.heartbeat(signing.heartbeat())
    return scheduler.inbox.authorize(signing.authorize(taskid))


def report(scheduler: Scheduler, taskid: str, worker: Wallet, status: str, **fields: Any) -> None:
    scheduler.inbox.report(_signing(scheduler, worker).report(taskid, status, **fields))


def _deal(devnet: DevnetHandle, **kw: Any) -> Any:
    return match_deal(
        devnet.client,
        app=devnet.app("echo"),
        app_owner_key=devnet.key("app_provider"),
        workerpool=devnet.info["workerpool"],
        scheduler_key=devnet.key("scheduler"),
        requester_key=devnet.key("requester"),
        **kw,
    )


def test_no_contribution_times_out_then_all_tasks_are_claimed_in_one_transaction(
    chain_snapshot: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    deal = _deal(devnet, volume=3)
    scheduler.tick()
    assert {store.task(t)["status"] for t in deal.taskids()} == {"RUNNING"}  # type: ignore[index]
    # When the contribution deadline passes with no worker around
    devnet.increase_time(7 * TIMEREF + 1)
    scheduler.tick()
    # Then the tasks are CONTRIBUTION_TIMEOUT, still ACTIVE on chain
    for taskid in deal.taskids():
        assert store.task(taskid)["status"] == "CONTRIBUTION_TIMEOUT"  # type: ignore[index]
        assert devnet.client.view_task(taskid).status == ChainTaskStatus.ACTIVE
    # And at the final deadline all three are claimed by one claimArray transaction
    devnet.increase_time(3 * TIMEREF)
    report = scheduler.tick()
    assert report.tasks_claimed == 3
    hashes = set()
    for taskid in deal.taskids():
        doc = store.task(taskid)
        assert doc is not None and doc["status"] == "FAILED"
        assert devnet.client.view_task(taskid).status == ChainTaskStatus.FAILED
        hashes.add(doc["timeline"][-1]["txHash"])
    assert len(hashes) == 1


def test_consensus_nobody_reveals_is_reopened_and_replanned(
    chain_snapshot: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
    redis_client: Any,
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    deal = _deal(devnet)
    (taskid,) = deal.taskids()
    scheduler.tick()
    # Given a worker that is authorized, contributes, and then never reveals
    worker = devnet.worker_wallet(6)
    grant = authorize(scheduler, taskid, worker)
    assert grant.granted
    actions.contribute(worker, taskid, DIGEST, grant.signature)
    report(scheduler, taskid, worker, "CONTRIBUTED")
    assert store.task(taskid)["status"] == "CONSENSUS_REACHED"  # type: ignore[index]
    assert redis_client.llen(worker_queue(worker.address)) == 1  # the reveal request
    jobs_before = redis_client.llen(REPLICATE_QUEUES["standard"])
    # When the reveal deadline passes
    devnet.increase_time(2 * TIMEREF + 1)
    scheduler.tick()
    # Then the task is reopened on chain, the silent winner rejected, a new replicate planned
    doc = store.task(taskid)
    assert doc is not None and doc["status"] == "REOPENED"
    chain = devnet.client.view_task(taskid)
    assert chain.status == ChainTaskStatus.ACTIVE
    contribution = devnet.client.view_contribution(taskid, worker.address)
    assert contribution.status == ContributionStatus.REJECTED
    assert store.replicate(taskid, worker.address)["status"] == "ABORTED"  # type: ignore[index]
    assert redis_client.llen(REPLICATE_QUEUES["standard"]) == jobs_before + 1
    assert doc["replicatesNeeded"] == 2


def test_jobs_lost_with_redis_are_rebuilt_from_mongo(
    devnet: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
    redis_client: Any,
) -> None:
    scheduler = make_scheduler()
    deal = _deal(devnet, volume=2)
    scheduler.tick()
    queue = REPLICATE_QUEUES["standard"]
    assert redis_client.llen(queue) == 2
    # Given Redis loses its queues (a restart without persistence)
    redis_client.flushdb()
    # When the grace period has passed, Then the next tick queues the owed jobs again
    scheduler.tick()
    assert redis_client.llen(queue) == 0  # not before the grace period: jobs may be in flight
    for taskid in deal.taskids():
        store.set_task_fields(taskid, {"enqueuedAt": 0})
    report = scheduler.tick()
    assert report.jobs_enqueued == 2 and redis_client.llen(queue) == 2
    # And not again within the grace period (the new jobs are in the queue)
    again = scheduler.tick()
    assert again.jobs_enqueued == 0


def test_a_repeated_reveal_report_does_not_undo_an_upload_and_a_failed_upload_is_asked_again(
    chain_snapshot: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
    redis_client: Any,
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler(reveal_timeout_period=1000)
    deal = _deal(devnet)
    (taskid,) = deal.taskids()
    scheduler.tick()
    worker = devnet.worker_wallet(7)
    grant = authorize(scheduler, taskid, worker)
    actions.contribute(worker, taskid, DIGEST, grant.signature)
    report(scheduler, taskid, worker, "CONTRIBUTED")
    actions.reveal(worker, taskid, DIGEST)
    report(scheduler, taskid, worker, "REVEALED")
    report(scheduler, taskid, worker, "RESULT_UPLOADING")
    assert store.task(taskid)["status"] == "RESULT_UPLOADING"  # type: ignore[index]
    # When a late or repeated REVEALED report arrives (a resumed node reveals again)
    report(scheduler, taskid, worker, "REVEALED", note="already revealed")
    # Then the upload under way is not undone
    assert store.task(taskid)["status"] == "RESULT_UPLOADING"  # type: ignore[index]
    assert store.replicate(taskid, worker.address)["status"] == "RESULT_UPLOADING"  # type: ignore[index]
    # When the upload really fails (the node says so) and no other winner exists
    queue = worker_queue(worker.address)
    before = redis_client.llen(queue)
    report(
        scheduler,
        taskid,
        worker,
        "REVEALED",
        reason="upload failed: ipfs",
        upload_failed=True,
    )
    doc = store.task(taskid)
    assert doc is not None and doc["status"] == "AT_LEAST_ONE_REVEALED"
    assert redis_client.llen(queue) == before  # nobody else to ask right away
    # Then the same winner is asked again once REVEAL_TIMEOUT_PERIOD has passed
    store.set_task_fields(
        taskid, {"uploadFailedAt": doc["uploadFailedAt"] - dt.timedelta(seconds=2)}
    )
    scheduler.tick()
    assert store.task(taskid)["status"] == "RESULT_UPLOADING"  # type: ignore[index]
    assert redis_client.llen(queue) == before + 1


def test_a_contribute_and_finalize_whose_report_was_lost_is_found_on_chain(
    chain_snapshot: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    deal = _deal(devnet)  # trust 1
    (taskid,) = deal.taskids()
    scheduler.tick()
    worker = devnet.worker_wallet(8)
    grant = authorize(scheduler, taskid, worker)
    assert grant.fast_path is True
    # Given the worker finished the task in one transaction and only CONTRIBUTING reached us
    report(scheduler, taskid, worker, "CONTRIBUTING")
    actions.contribute_and_finalize(worker, taskid, DIGEST, b"the-link", grant.signature)
    # When the scheduler ticks before the grace for a report: it waits for the report
    scheduler.tick()
    assert store.task(taskid)["status"] == "RUNNING"  # type: ignore[index]
    # When the report is still missing after the grace
    store.replicates.update_one(
        {"chainTaskId": taskid},
        {"$set": {"updatedAt": utcnow() - dt.timedelta(seconds=UNREPORTED_GRACE + 1)}},
    )
    scheduler.tick()
    # Then it finds the task completed on chain and records it
    doc = store.task(taskid)
    assert doc is not None and doc["status"] == "COMPLETED"
    assert doc["resultLink"] == "the-link"
    assert any("found finalized on chain" in e.get("note", "") for e in doc["timeline"])
    assert store.replicate(taskid, worker.address)["status"] == "COMPLETED"  # type: ignore[index]


def test_trust_above_one_or_the_setting_off_keeps_the_classic_path(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler]
) -> None:
    devnet = chain_snapshot
    trust2 = _deal(devnet, trust=2)
    trust1 = _deal(devnet)
    scheduler = make_scheduler(contribute_and_finalize=False)
    scheduler.tick()
    worker = devnet.worker_wallet(9)
    assert authorize(scheduler, trust1.taskids()[0], worker).fast_path is False
    classic = make_scheduler()
    assert authorize(classic, trust2.taskids()[0], worker).fast_path is False
