"""The scheduler's first half on the real chain, a real redis-server and the mongomock store:
SchedulerNotice -> Mongo deal state -> initializeArray batches -> replicate jobs on Redis."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle, free_port

from devnet.network import Devnet, ensure_tools
from devnet.network import up as devnet_up
from devnet.requester import match_deal
from poco.chain import ChainClient
from poco.errors import TransportError
from poco.types import ChainTaskStatus
from pool.messages import REPLICATE_QUEUES, Messenger, make_celery
from pool.settings import Settings
from pool.states import InvalidTransition, TaskStatus
from pool.store import Store
from scheduler.context import SchedulerContext
from scheduler.service import Scheduler
from testing.store import memory_store

pytestmark = pytest.mark.devnet

STANDARD = REPLICATE_QUEUES["standard"]


def _match(devnet: DevnetHandle, **kw: Any) -> Any:
    return match_deal(
        devnet.client,
        app=devnet.app("echo"),
        app_owner_key=devnet.key("app_provider"),
        workerpool=kw.pop("workerpool", devnet.info["workerpool"]),
        scheduler_key=kw.pop("scheduler_key", devnet.key("scheduler")),
        requester_key=devnet.key("requester"),
        **kw,
    )


def test_volume5_deal_is_stored_initialized_in_two_tx_at_most_and_queued(
    devnet: DevnetHandle, store: Store, make_scheduler: Callable[..., Scheduler], redis_client: Any
) -> None:
    # Given a deal of volume 5 for the pool
    scheduler = make_scheduler()
    deal = _match(devnet, volume=5)
    # When one poll runs
    report = scheduler.tick()
    # Then Mongo holds the deal and its 5 tasks
    assert report.deals_new == 1 and not report.errors
    stored = store.deal(deal.dealid)
    assert stored is not None and stored["status"] == "ACCEPTED" and stored["botSize"] == 5
    tasks = store.tasks_in(TaskStatus, chainDealId=deal.dealid)
    assert sorted(t["chainTaskId"] for t in tasks) == sorted(deal.taskids())
    # And the 5 tasks are ACTIVE on chain after at most 2 transactions
    assert report.init_transactions <= 2 and report.tasks_initialized == 5
    for taskid in deal.taskids():
        assert devnet.client.view_task(taskid).status == ChainTaskStatus.ACTIVE
        assert store.task(taskid)["status"] == "RUNNING"  # type: ignore[index]
        timeline = [e["status"] for e in store.task(taskid)["timeline"]]  # type: ignore[index]
        assert timeline == ["RECEIVED", "INITIALIZING", "INITIALIZED", "RUNNING"]
        init = store.task(taskid)["timeline"][2]  # type: ignore[index]
        assert init["txHash"].startswith("0x") and init["at"] is not None
    # And 5 messages wait on replicates.standard in Redis
    assert redis_client.llen(STANDARD) == 5
    # A second tick finds nothing new and enqueues nothing more
    again = scheduler.tick()
    assert (again.deals_new, again.jobs_enqueued) == (0, 0)
    assert redis_client.llen(STANDARD) == 5


def test_the_fast_listen_picks_a_deal_up_without_a_full_tick(
    devnet: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduler = make_scheduler()
    scheduler.listen_tick()  # up to date with the chain

    def no_full_tick(*_: Any, **__: Any) -> None:
        raise AssertionError("the fast listen ran a step of the full tick")

    monkeypatch.setattr(scheduler.reconciler, "reconcile", no_full_tick)
    monkeypatch.setattr(scheduler.planner, "requeue_lost_jobs", no_full_tick)
    # Given a deal of volume 2 matched after the last listen
    deal = _match(devnet, volume=2)
    # When the fast listen runs (not the tick)
    report = scheduler.listen_tick()
    # Then the deal is stored, its tasks are initialized on chain and their jobs queued
    assert report.deals_new == 1 and not report.errors and not report.skipped_tick
    assert report.tasks_initialized == 2 and report.jobs_enqueued == 2
    for taskid in deal.taskids():
        assert devnet.client.view_task(taskid).status == ChainTaskStatus.ACTIVE
        assert store.task(taskid)["status"] == "RUNNING"  # type: ignore[index]
    assert redis_client.llen(STANDARD) == 2
    # And once it has read the blocks of its own initializeArray, while no block comes, a
    # listen asks the chain for its head and nothing else
    assert scheduler.listen_tick().deals_new == 0
    calls: list[str] = []
    for name in ("get_logs", "view_deal", "view_task", "block_timestamp"):
        monkeypatch.setattr(scheduler.ctx.client, name, lambda *a, _n=name, **k: calls.append(_n))
    assert scheduler.listen_tick().deals_new == 0 and calls == []


def test_a_fast_listen_steps_aside_while_a_tick_holds_the_lock(
    devnet: DevnetHandle, store: Store, make_scheduler: Callable[..., Scheduler], redis_client: Any
) -> None:
    # Given another scheduler's tick holding the Redis tick lock
    scheduler = make_scheduler()
    deal = _match(devnet)
    redis_client.set("workerpool:scheduler:tick", "another-scheduler", px=30_000)
    try:
        # When the fast listen runs, it reads nothing and changes nothing
        report = scheduler.listen_tick()
        assert report.skipped_tick and store.deal(deal.dealid) is None
    finally:
        redis_client.delete("workerpool:scheduler:tick")
    # Then the next one (the lock free again) picks the deal up
    assert scheduler.listen_tick().deals_new == 1
    assert redis_client.llen(STANDARD) == 1


def test_deal_of_another_pool_is_ignored_and_unserved_category_is_skipped_with_reason(
    devnet: DevnetHandle, store: Store, make_scheduler: Callable[..., Scheduler], redis_client: Any
) -> None:
    # Given a second workerpool owned by someone else, and a pool serving category 0 only
    registry = devnet.client.contract("WorkerpoolRegistry", devnet.info["workerpool_registry"])
    other_owner = devnet.wallet("deployer")
    description = f"other pool {devnet.client.block_number()}"
    other_pool = registry.functions.predictWorkerpool(other_owner.address, description).call()
    other_owner.transact(registry.functions.createWorkerpool(other_owner.address, description))
    scheduler = make_scheduler(categories=(0,))
    foreign = _match(devnet, workerpool=other_pool, scheduler_key=devnet.key("deployer"))
    unserved = _match(devnet, category=1)
    # When the scheduler polls
    report = scheduler.tick()
    # Then the foreign deal is not stored at all, the category-1 deal is stored as SKIPPED
    assert store.deal(foreign.dealid) is None
    skipped = store.deal(unserved.dealid)
    assert skipped is not None and skipped["status"] == "SKIPPED"
    assert "category 1 (S) is not served" in skipped["skipReason"]
    assert store.tasks_in(TaskStatus, chainDealId=unserved.dealid) == []
    assert report.deals_skipped == 1 and report.jobs_enqueued == 0
    assert devnet.client.view_task(unserved.taskids()[0]).status == ChainTaskStatus.UNSET
    assert redis_client.llen(STANDARD) == 0


def test_second_scheduler_on_the_same_store_duplicates_nothing(
    devnet: DevnetHandle, store: Store, make_scheduler: Callable[..., Scheduler], redis_client: Any
) -> None:
    first = make_scheduler()
    deal = _match(devnet, volume=3)
    first.tick()
    # Given a second scheduler on the same Mongo that re-polls the same blocks from scratch
    store.cursors.delete_many({})
    second = make_scheduler()
    report = second.tick()
    # Then it duplicates nothing: same deal, same 3 tasks, no new jobs
    assert report.deals_new == 0 and report.jobs_enqueued == 0
    assert store.deals.count_documents({"chainDealId": deal.dealid}) == 1
    assert store.tasks.count_documents({"chainDealId": deal.dealid}) == 3
    assert redis_client.llen(STANDARD) == 3


def test_crash_between_storing_a_deal_and_advancing_the_cursor_loses_nothing(
    devnet: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduler = make_scheduler()
    deal = _match(devnet, volume=2)

    class Killed(BaseException):
        pass

    def die(*_: Any, **__: Any) -> None:
        raise Killed("scheduler killed before advancing its cursor")

    # Given a scheduler that dies right after storing the deal
    monkeypatch.setattr(store, "advance_cursor", die)
    with pytest.raises(Killed):
        scheduler.tick()
    assert store.deal(deal.dealid) is not None
    assert store.get_cursor(scheduler.deals.cursor_name) is None
    monkeypatch.undo()
    # When a fresh scheduler process starts on the same store (the Redis lock expired)
    redis_client.delete("workerpool:scheduler:tick")
    restarted = make_scheduler()
    report = restarted.tick()
    # Then the deal is there once, its tasks are initialized and queued once
    assert store.deals.count_documents({"chainDealId": deal.dealid}) == 1
    assert store.tasks.count_documents({"chainDealId": deal.dealid}) == 2
    assert report.tasks_initialized == 2
    assert redis_client.llen(STANDARD) == 2
    assert store.get_cursor(restarted.deals.cursor_name) == report.head


def test_rpc_failing_for_one_poll_loses_nothing(
    devnet: DevnetHandle,
    store: Store,
    make_scheduler: Callable[..., Scheduler],
    redis_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduler = make_scheduler()
    deal = _match(devnet)

    def down(*_: Any, **__: Any) -> Any:
        raise TransportError("chain node unreachable (injected)")

    # Given the RPC fails during one poll
    monkeypatch.setattr(scheduler.ctx.client, "get_logs", down)
    report = scheduler.tick()
    assert report.errors and store.deal(deal.dealid) is None
    monkeypatch.undo()
    # When the next poll runs, it catches up
    report = scheduler.tick()
    assert report.deals_new == 1 and report.tasks_initialized == 1
    assert redis_client.llen(STANDARD) == 1


def test_a_gap_of_5000_blocks_is_read_in_ranges(
    tmp_path: Path, redis_url: str, redis_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a chain whose first 5,000 blocks are empty, then PoCo and a deal (a chain of its
    # own: on a chain holding PoCo's state anvil mines ~7 ms a block, 40 s for 5,000)
    gap = Devnet(tmp_path, port=free_port())
    anvil, _ = ensure_tools()
    gap.start_anvil(anvil, prune_history=True)
    try:
        # (a long timeout: on a busy machine 500 empty blocks may take more than 10 s)
        client = ChainClient(gap.rpc_url, "0x" + "00" * 20, request_timeout=120)
        for _ in range(10):  # anvil_mine slows down superlinearly with the count: 10 x 500
            client.w3.provider.make_request("anvil_mine", [hex(500)])  # type: ignore[arg-type]
        info, _, _ = devnet_up(tmp_path, port=gap.port)
        handle = DevnetHandle(tmp_path, info, ChainClient(info["rpc_url"], info["hub"]))
        deal = _match(handle)
        settings = Settings(
            chain_rpc_url=info["rpc_url"],
            hub_address=info["hub"],
            pool_address=info["workerpool"],
            start_block=0,
            redis_url=redis_url,
            log_range=1000,
        )
        chain = ChainClient(info["rpc_url"], info["hub"], log_chunk=1000)
        store = memory_store("gap")
        ctx = SchedulerContext(
            settings,
            store,
            chain,
            chain.wallet(handle.key("scheduler")),
            Messenger(make_celery(settings)),
            redis_client,
        )
        scheduler = Scheduler(ctx)
        ranges: list[tuple[int, int]] = []
        original = chain.get_logs

        def spy(event: str, lo: int, hi: int, *a: Any, **kw: Any) -> Any:
            ranges.append((lo, hi))
            return original(event, lo, hi, *a, **kw)

        monkeypatch.setattr(chain, "get_logs", spy)
        # When the scheduler polls from block 0
        report = scheduler.tick()
        # Then it read the gap in ranges of at most 1,000 blocks and found the deal
        assert report.head is not None and report.head > 5000
        assert report.deals_new == 1 and store.deal(deal.dealid) is not None
        assert len(ranges) >= 6 and all(hi - lo + 1 <= 1000 for lo, hi in ranges)
        assert ranges[0][0] == 0 and ranges[-1][1] == report.head
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))
    finally:
        gap.stop()


def test_status_transitions_not_in_the_table_are_refused(store: Store) -> None:
    store.save_deal(
        {"chainDealId": "0xd"},
        [{"chainTaskId": "0xt", "chainDealId": "0xd", "status": "RECEIVED", "finalDeadline": 1}],
    )
    with pytest.raises(InvalidTransition, match="RECEIVED -> COMPLETED"):
        store.transition_task("0xt", TaskStatus.COMPLETED)
    store.transition_task("0xt", TaskStatus.INITIALIZING)
    store.transition_task("0xt", TaskStatus.INITIALIZING)  # idempotent re-apply
    with pytest.raises(InvalidTransition):
        store.transition_task("0xt", TaskStatus.FINALIZING)
    assert store.task("0xt")["status"] == "INITIALIZING"  # type: ignore[index]
    assert [e["status"] for e in store.task("0xt")["timeline"]] == ["RECEIVED", "INITIALIZING"]  # type: ignore[index]
