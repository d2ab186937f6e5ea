"""Chain reorganisations, on the devnet with ``anvil_reorg`` (it replaces the last blocks).

The listener reads the last WORKERPOOL_REORG_WINDOW blocks again on every poll, and before
any task of a deal is initialized the deal is checked to still be where its SchedulerNotice
was: a deal a reorganisation removed is dropped before anything is sent for it; a deal mined
again at another height is taken once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from devnet_fixtures import DevnetHandle

from devnet.requester import MatchedDeal, match_deal
from poco import actions
from poco import chain as chain_mod
from poco.orders import DatasetOrder
from poco.types import ChainTaskStatus, Resource
from pool.messages import Messenger
from pool.settings import Settings
from pool.store import Store
from scheduler.context import SchedulerContext, TickReport
from scheduler.service import Scheduler
from testing.celery import FakeCelery
from testing.chain import POOL as FAKE_POOL
from testing.chain import ZERO as FAKE_ZERO
from testing.chain import FakeChain, FakeWallet
from testing.store import memory_store

pytestmark = [pytest.mark.devnet, pytest.mark.redis]


def test_default_confirmations_depend_on_the_chain() -> None:
    assert Settings().confirmations_for(42161) == 20  # Arbitrum One
    assert Settings().confirmations_for(421614) == 20  # Arbitrum Sepolia
    assert Settings().confirmations_for(1) == 12
    assert Settings().confirmations_for(31337) == 0  # a devnet never reorganises
    assert Settings().confirmations_for(777) == 12  # unknown: the cautious default
    explicit = Settings.from_env({"WORKERPOOL_CONFIRMATIONS": "3"})
    assert explicit.confirmations_for(42161) == 3 and explicit.confirmations_for(31337) == 3
    assert Settings.from_env({"WORKERPOOL_CONFIRMATIONS": "0"}).confirmations_for(42161) == 0


def _match(devnet: DevnetHandle, volume: int = 2) -> MatchedDeal:
    return match_deal(
        devnet.client,
        app=devnet.app("echo"),
        app_owner_key=devnet.key("app_provider"),
        workerpool=devnet.info["workerpool"],
        scheduler_key=devnet.key("scheduler"),
        requester_key=devnet.key("requester"),
        volume=volume,
    )


def _rematch(devnet: DevnetHandle, deal: MatchedDeal) -> int:
    """Mine the very same deal again (same orders, so the same dealid): its block number."""
    requester = devnet.wallet("requester")
    dealid, receipt = actions.match_orders(
        requester, deal.apporder, deal.datasetorder, deal.workerpoolorder, deal.requestorder
    )
    assert dealid == deal.dealid
    return receipt.block_number


def _reorg_away(devnet: DevnetHandle, block: int) -> None:
    """Replace every block from ``block`` to the head with empty ones (same height)."""
    depth = devnet.client.block_number() - block + 1
    answer = devnet.rpc("anvil_reorg", [depth, []])
    assert "error" not in answer, answer
    chain_mod.reset_nonces()  # the removed transactions' nonces are free again


def _sent_by_scheduler(devnet: DevnetHandle) -> int:
    return int(devnet.client.eth.get_transaction_count(devnet.address("scheduler")))


def _task_statuses(store: Store, dealid: str) -> list[str]:
    return sorted(t["status"] for t in store.tasks.find({"chainDealId": dealid}))


def _initialized_once(store: Store, dealid: str) -> int:
    """How many tasks of the deal are stored, each initialized exactly once (then planned)."""
    tasks = list(store.tasks.find({"chainDealId": dealid}))
    for task in tasks:
        steps = [e["status"] for e in task["timeline"]]
        assert steps.count("INITIALIZED") == 1 and steps[:3] == [
            "RECEIVED",
            "INITIALIZING",
            "INITIALIZED",
        ], steps
    return len(tasks)


def test_a_deal_removed_by_a_reorg_before_the_pool_acts_is_dropped_with_nothing_sent(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler], store: Store
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    scheduler.tick()  # the listener's cursor at the head
    deal = _match(devnet)
    scheduler.deals.listen(TickReport())  # seen and stored; the pool has not acted yet
    assert _task_statuses(store, deal.dealid) == ["RECEIVED", "RECEIVED"]
    sent = _sent_by_scheduler(devnet)

    _reorg_away(devnet, deal.receipt.block_number)
    assert not devnet.client.view_deal(deal.dealid, fresh=True).exists
    report = scheduler.tick()
    scheduler.tick()

    assert report.tasks_initialized == 0 and report.init_transactions == 0, report
    assert _sent_by_scheduler(devnet) == sent  # no initialize, nothing at all
    stored = store.deal(deal.dealid)
    assert stored is not None and stored["status"] == "REORGED"
    assert stored["timeline"][-1]["note"].startswith(f"block {deal.receipt.block_number} left")
    assert _task_statuses(store, deal.dealid) == []
    for taskid in deal.taskids():
        assert devnet.client.view_task(taskid).status == ChainTaskStatus.UNSET


def test_a_dropped_deal_mined_again_at_another_height_is_taken_once(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler], store: Store
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    scheduler.tick()
    deal = _match(devnet)
    first_block = deal.receipt.block_number
    scheduler.deals.listen(TickReport())
    _reorg_away(devnet, first_block)
    scheduler.initializer.initialize(TickReport())  # before anything is sent: dropped
    assert store.deal(deal.dealid)["status"] == "REORGED"  # type: ignore[index]
    sent = _sent_by_scheduler(devnet)

    devnet.rpc("evm_mine", [])
    devnet.rpc("evm_mine", [])
    block = _rematch(devnet, deal)  # the requester's transaction, mined again higher up
    assert block > first_block
    reports = [scheduler.tick() for _ in range(3)]

    assert [r.deals_new for r in reports] == [1, 0, 0]
    assert sum(r.tasks_initialized for r in reports) == 2
    assert sum(r.init_transactions for r in reports) == 1
    assert _sent_by_scheduler(devnet) == sent + 1  # one initializeArray for both tasks
    stored = store.deal(deal.dealid)
    assert stored is not None and stored["status"] == "ACCEPTED"
    assert stored["blockNumber"] == block
    assert stored["blockHash"] == devnet.client.block_hash(block)
    assert stored["startTime"] == devnet.client.view_deal(deal.dealid, fresh=True).start_time
    assert [e["status"] for e in stored["timeline"]] == ["REORGED", "ACCEPTED"]
    assert _initialized_once(store, deal.dealid) == 2
    for taskid in deal.taskids():
        assert devnet.client.view_task(taskid).status == ChainTaskStatus.ACTIVE


def test_a_stored_deal_moved_by_a_reorg_is_read_again_and_taken_once(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler], store: Store
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    scheduler.tick()
    deal = _match(devnet, volume=1)
    scheduler.deals.listen(TickReport())
    _reorg_away(devnet, deal.receipt.block_number)
    devnet.rpc("evm_mine", [])
    block = _rematch(devnet, deal)  # moved before the pool acted on it
    sent = _sent_by_scheduler(devnet)

    reports = [scheduler.tick() for _ in range(2)]

    assert [r.deals_new for r in reports] == [1, 0]  # seen again: stored anew, once
    assert sum(r.init_transactions for r in reports) == 1
    assert _sent_by_scheduler(devnet) == sent + 1
    stored = store.deal(deal.dealid)
    assert stored is not None and stored["blockNumber"] == block
    assert stored["timeline"][0]["note"].startswith("moved by a chain reorganisation")
    assert _initialized_once(store, deal.dealid) == 1


def test_a_deal_a_reorg_puts_in_blocks_the_listener_had_read_is_seen(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler], store: Store
) -> None:
    devnet = chain_snapshot
    scheduler = make_scheduler()
    deal = _match(devnet, volume=1)  # mined, then taken away before the listener reads it
    _reorg_away(devnet, deal.receipt.block_number)
    devnet.rpc("evm_mine", [])
    scheduler.tick()  # the listener reads up to the head: no deal there
    cursor = store.get_cursor(scheduler.deals.cursor_name)
    assert cursor == devnet.client.block_number() and store.deal(deal.dealid) is None

    # the new chain has the deal in a block the listener has already read
    hub = devnet.client.hub.functions.matchOrders(
        deal.apporder.as_tuple(),
        DatasetOrder().as_tuple(),
        deal.workerpoolorder.as_tuple(),
        deal.requestorder.as_tuple(),
    )
    request = {
        "from": devnet.address("requester"),  # an account anvil unlocks: it signs
        "to": devnet.info["hub"],
        "data": hub._encode_transaction_data(),
        "gas": hex(3_000_000),
    }
    answer = devnet.rpc("anvil_reorg", [2, [[request, 0]]])
    assert "error" not in answer, answer
    chain_mod.reset_nonces()
    assert devnet.client.view_deal(deal.dealid, fresh=True).exists
    notice = next(
        devnet.client.get_logs(
            "SchedulerNotice", cursor - 1, cursor, {"workerpool": devnet.info["workerpool"]}
        )
    )
    assert int(notice["blockNumber"]) <= cursor

    reports = [scheduler.tick() for _ in range(2)]

    assert [r.deals_new for r in reports] == [1, 0]
    assert sum(r.tasks_initialized for r in reports) == 1
    stored = store.deal(deal.dealid)
    assert stored is not None and stored["blockNumber"] == int(notice["blockNumber"])
    assert _initialized_once(store, deal.dealid) == 1


def test_outside_the_reorg_window_the_listener_reads_only_new_blocks(
    chain_snapshot: DevnetHandle, make_scheduler: Callable[..., Scheduler], store: Store
) -> None:
    """WORKERPOOL_REORG_WINDOW=0 turns the re-read off: the same deal is then missed, which
    is what the window is for."""
    devnet = chain_snapshot
    scheduler = make_scheduler(reorg_window=0)
    deal = _match(devnet, volume=1)
    _reorg_away(devnet, deal.receipt.block_number)
    devnet.rpc("evm_mine", [])
    scheduler.tick()
    cursor = store.get_cursor(scheduler.deals.cursor_name)
    assert cursor is not None
    request = {
        "from": devnet.address("requester"),
        "to": devnet.info["hub"],
        "data": devnet.client.hub.functions.matchOrders(
            deal.apporder.as_tuple(),
            DatasetOrder().as_tuple(),
            deal.workerpoolorder.as_tuple(),
            deal.requestorder.as_tuple(),
        )._encode_transaction_data(),
        "gas": hex(3_000_000),
    }
    devnet.rpc("anvil_reorg", [2, [[request, 0]]])
    chain_mod.reset_nonces()
    assert [scheduler.tick().deals_new for _ in range(2)] == [0, 0]
    assert store.deal(deal.dealid) is None


def test_a_deal_back_at_the_very_block_it_left_is_taken_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reorganisation undone (the first fork wins after all): the deal is back at the block
    hash it was stored with. anvil cannot bring a replaced block back, so the fake chain
    plays it: its block hash changes and the deal vanishes, then both come back."""
    chain = FakeChain()
    store = memory_store("reorg-back")
    settings = Settings(pool_address=FAKE_POOL, chain_rpc_url="http://fake", hub_address=FAKE_POOL)
    ctx = SchedulerContext(settings, store, chain, FakeWallet(chain), Messenger(FakeCelery()))  # type: ignore[arg-type]
    scheduler = Scheduler(ctx)
    dealid = chain.add_deal(1, size=1)
    block, deal = chain.head, chain.deals[dealid]
    scheduler.deals.listen(TickReport())
    kept = chain.block_hash
    # the other fork: another block at that height, without the deal
    monkeypatch.setattr(chain, "block_hash", lambda n: "0x" + "ee" * 32 if n == block else kept(n))
    chain.deals[dealid] = dataclasses.replace(deal, app=Resource(FAKE_ZERO, FAKE_ZERO, 0))
    scheduler.initializer.initialize(TickReport())
    assert store.deal(dealid)["status"] == "REORGED"  # type: ignore[index]
    assert chain.txs["initializeArray"] == 0
    # the first fork again: same block, same hash, the deal with it
    monkeypatch.setattr(chain, "block_hash", kept)
    chain.deals[dealid] = deal
    reports = [scheduler.tick() for _ in range(2)]
    assert [r.deals_new for r in reports] == [1, 0]
    assert chain.txs["initializeArray"] == 1
    assert [e["status"] for e in store.deal(dealid)["timeline"]] == ["REORGED", "ACCEPTED"]  # type: ignore[index]
