"""The replenish policy on the devnet: it publishes orders when the fleet has free capacity,
sized to it, and withdraws them when the fleet is full.

Worker heartbeats are written to the store as the scheduler records them (``slots``,
``busySlots``, ``status``, ``lastSeen``); the last test runs real worker nodes instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle
from flask import Flask
from pool_fixtures import RunningPool

from api.orderbook import orderbook_blueprint
from devnet.requester import match_deal
from orders.replenish import Replenisher, ReplenishResult
from orders.store import OrderStore
from poco.chain import Wallet
from poco.orders import WorkerpoolOrder
from pool.clock import utcnow
from pool.settings import Settings
from pool.store import Store
from scheduler.context import TickReport
from testing.store import memory_store

pytestmark = pytest.mark.devnet

PRICE = 1000


@dataclass
class Fleet:
    devnet: DevnetHandle
    settings: Settings
    store: Store
    wallet: Wallet  # the scheduler's
    api: Any  # a Flask test client on the orderbook
    current: Settings | None = None  # the settings of the last replenisher() asked for

    def replenisher(self, **settings: Any) -> Replenisher:
        if settings or self.current is None:
            self.current = dataclasses.replace(self.settings, **settings)
        return Replenisher(self.current, self.store, self.devnet.client, self.wallet)

    def worker(
        self,
        name: str,
        slots: int,
        busy: int,
        *,
        status: str = "ALIVE",
        capabilities: tuple[str, ...] = ("standard",),
        age: float = 0,
    ) -> None:
        """A heartbeat as the scheduler stores it."""
        self.store.workers.update_one(
            {"address": name},
            {
                "$set": {
                    "slots": slots,
                    "busySlots": busy,
                    "status": status,
                    "capabilities": list(capabilities),
                    "lastSeen": utcnow() - dt.timedelta(seconds=age),
                }
            },
            upsert=True,
        )

    def listed(self) -> list[dict[str, Any]]:
        chain_id = self.devnet.client.chain_id
        body = self.api.get(f"/workerpoolorders?chainId={chain_id}").get_json()
        assert body["ok"], body
        return list(body["orders"])

    def buy(self, entry: dict[str, Any], volume: int) -> str:
        return match_deal(
            self.devnet.client,
            app=self.devnet.app("echo"),
            app_owner_key=self.devnet.key("app_provider"),
            workerpool=self.devnet.info["workerpool"],
            scheduler_key=self.devnet.key("scheduler"),
            requester_key=self.devnet.key("requester"),
            volume=volume,
            trust=int(entry["order"]["trust"]),
            workerpoolorder=WorkerpoolOrder.from_dict(entry["order"]),
        ).dealid


def _settings(devnet: DevnetHandle, **extra: Any) -> Settings:
    return Settings(
        chain_rpc_url=devnet.info["rpc_url"],
        hub_address=devnet.info["hub"],
        pool_address=devnet.info["workerpool"],
        devnet=True,
        order_price=PRICE,
        replenish_orders=2,
        orderbook_sync_interval=1e-6,
        **extra,
    )


def _orderbook_client(settings: Settings, store: Store, devnet: DevnetHandle) -> Any:
    app = Flask("replenish-test")
    app.register_blueprint(orderbook_blueprint(settings, store, devnet.client))
    return app.test_client()


@pytest.fixture
def fleet(devnet: DevnetHandle) -> Iterator[Fleet]:
    settings = _settings(devnet)
    store = memory_store("replenish")
    wallet = devnet.wallet("scheduler")
    yield Fleet(devnet, settings, store, wallet, _orderbook_client(settings, store, devnet))


@pytest.fixture(scope="module")
def redis_url(redis_url: str) -> str:
    """This module's own Redis database: worker nodes of other test sessions sharing the
    redis-server (db 0) must not take this pool's jobs off the shared replicate queues."""
    return redis_url.rsplit("/", 1)[0] + "/7"


def _volumes(entries: list[dict[str, Any]]) -> list[int]:
    return sorted(int(e["remaining"]) for e in entries)


def test_publishes_when_capacity_frees_and_stops_when_the_fleet_is_full(
    fleet: Fleet, chain_snapshot: DevnetHandle
) -> None:
    replenisher = fleet.replenisher()
    client = fleet.devnet.client
    owner = fleet.devnet.address("scheduler")
    # Given no worker: nothing to sell
    result = replenisher.replenish()
    assert (result.capacity, result.published) == (0, [])
    # Given a full fleet: nothing to sell either
    fleet.worker("0xa", slots=4, busy=4)
    assert replenisher.replenish().published == []
    assert fleet.listed() == []
    # When 3 slots free up: 2 orders (N) whose volumes share the 3 tasks, at the set price
    fleet.worker("0xa", slots=4, busy=1)
    result = replenisher.replenish()
    assert (result.capacity, len(result.published), result.offered) == (3, 2, 3)
    listed = fleet.listed()
    assert _volumes(listed) == [1, 2]
    domain = client.domain()
    for e in listed:
        order = WorkerpoolOrder.from_dict(e["order"])
        assert order.workerpoolprice == PRICE and e["signer"] == owner
        assert client.verify_signature(owner, order.hash(domain), order.sign)
    # And the next ticks leave them alone while nothing changes
    assert replenisher.replenish().published == []
    # When a second worker joins, the 2 orders stay (N reached): spare capacity waits for one
    fleet.worker("0xb", slots=2, busy=0)
    result = replenisher.replenish()
    assert (result.capacity, result.published, result.withdrawn) == (5, [], [])
    # When a requester buys the 2-task order whole, it is filled and replaced, sized to what
    # the fleet can take now (5 free, 1 still offered)
    two = next(e for e in listed if e["remaining"] == 2)
    fleet.buy(two, 2)
    result = replenisher.replenish()
    assert len(result.published) == 1 and result.offered == 5
    assert _volumes(fleet.listed()) == [1, 4]
    assert OrderStore(fleet.store.db).get(two["orderHash"])["status"] == "filled"  # type: ignore[index]
    # When the fleet is full again, the policy withdraws its orders and publishes nothing
    fleet.worker("0xa", slots=4, busy=4)
    fleet.worker("0xb", slots=2, busy=2)
    report = TickReport()
    result = replenisher.replenish(report)
    assert (result.capacity, result.published, len(result.withdrawn)) == (0, [], 2)
    assert fleet.listed() == [] and report.errors == []
    assert replenisher.replenish().published == []


def test_shrinking_capacity_withdraws_only_orders_the_fleet_cannot_serve(fleet: Fleet) -> None:
    replenisher = fleet.replenisher(replenish_orders=3)
    fleet.worker("0xa", slots=6, busy=0)
    assert replenisher.replenish().offered == 6  # 3 orders of 2
    fleet.worker("0xa", slots=6, busy=3)  # 3 free: the newest order of 2 is not needed
    result = replenisher.replenish()
    assert (len(result.withdrawn), result.offered) == (1, 4)
    assert _volumes(fleet.listed()) == [2, 2]
    fleet.worker("0xa", slots=6, busy=4)  # 2 free: one order still covers it
    result = replenisher.replenish()
    assert (len(result.withdrawn), result.offered) == (1, 2)


def test_stale_lost_and_other_capability_workers_and_the_backlog_do_not_count(
    fleet: Fleet,
) -> None:
    replenisher = fleet.replenisher()
    fleet.worker("0xold", slots=8, busy=0, age=3600)
    fleet.worker("0xlost", slots=8, busy=0, status="LOST")
    fleet.worker("0xtee", slots=8, busy=0, capabilities=("tee-scone",))
    assert replenisher.free_slots("standard") == 0
    assert replenisher.free_slots("tee-scone") == 8
    fleet.worker("0xa", slots=6, busy=0)
    assert replenisher.free_slots("standard") == 6
    # sold but not yet on a worker: 2 tasks waiting for initialization, 1 job queued
    for i, status in enumerate(("RECEIVED", "INITIALIZED")):
        fleet.store.tasks.insert_one(
            {
                "chainTaskId": f"t{i}",
                "queue": "replicates.standard",
                "status": status,
                "replicatesNeeded": 1,
            }
        )
    fleet.store.tasks.insert_one(
        {
            "chainTaskId": "t2",
            "queue": "replicates.standard",
            "status": "RUNNING",
            "jobsQueued": 2,
            "replicatesGranted": 1,
        }
    )
    fleet.store.tasks.insert_one(
        {
            "chainTaskId": "t3",
            "queue": "replicates.gpu",
            "status": "RECEIVED",
            "replicatesNeeded": 1,
        }
    )
    assert replenisher.backlog("replicates.standard") == 3
    result = replenisher.replenish()
    assert (result.free_slots, result.backlog, result.capacity) == (6, 3, 3)
    assert sum(_volumes(fleet.listed())) == 3
    # an order of trust 3 needs 2 replicates per task: half the tasks
    other = fleet.replenisher(order_trust=3, replenish_orders=1)
    OrderStore(fleet.store.db).orders.delete_many({})
    assert other.replenish().capacity == 1


def test_volume_is_capped_by_the_stake_and_refusals_are_reported(fleet: Fleet) -> None:
    stake = fleet.devnet.client.view_account(fleet.devnet.address("scheduler")).stake
    fleet.worker("0xa", slots=50, busy=0)
    # at a price whose pool stake is 30% of the owner's deposit per task, 3 tasks fit
    replenisher = fleet.replenisher(order_price=stake, replenish_orders=1)
    result = replenisher.replenish()
    assert (result.capacity, result.offered, result.errors) == (50, 3, [])
    # a refusal of the orderbook goes to the tick's report, it does not raise
    limited = fleet.replenisher(orderbook_max_open=1, replenish_orders=2)
    report = TickReport()
    result = limited.replenish(report)
    assert result.published == [] and "maximum of 1 published open" in result.errors[0]
    assert report.errors == [f"replenish: {result.errors[0]}"]


def test_cancel_mode_closes_withdrawn_orders_on_chain(
    fleet: Fleet, chain_snapshot: DevnetHandle
) -> None:
    replenisher = fleet.replenisher(replenish_cancel=True, replenish_orders=1)
    fleet.worker("0xa", slots=2, busy=0)
    (order_hash,) = replenisher.replenish().published
    fleet.worker("0xa", slots=2, busy=2)
    assert replenisher.replenish().withdrawn == [order_hash]
    assert fleet.devnet.client.view_consumed(order_hash) == 2  # closed: nothing left to match
    assert OrderStore(fleet.store.db).get(order_hash)["status"] == "cancelled"  # type: ignore[index]


def test_policy_off_does_nothing(fleet: Fleet) -> None:
    fleet.worker("0xa", slots=4, busy=0)
    assert fleet.replenisher(replenish_orders=0).replenish() == ReplenishResult(enabled=False)
    assert fleet.listed() == []


@pytest.mark.docker
@pytest.mark.redis
def test_a_real_worker_capacity_is_sold_bought_and_run(running_pool: RunningPool) -> None:
    """End to end: a worker node's heartbeat frees 2 slots, replenish publishes them, a
    requester buys the order from the orderbook and the pool runs the tasks."""
    pool = running_pool
    settings = dataclasses.replace(
        pool.scheduler.settings, order_price=PRICE, replenish_orders=1, orderbook_sync_interval=1e-6
    )
    replenisher = Replenisher(settings, pool.store, pool.devnet.client, pool.scheduler.ctx.wallet)
    api = _orderbook_client(settings, pool.store, pool.devnet)
    fleet = Fleet(pool.devnet, settings, pool.store, pool.scheduler.ctx.wallet, api)
    # Given one worker node with 2 slots (WORKERPOOL_WORKER_SLOTS=2)
    pool.start_worker(0)
    result = replenisher.replenish()
    assert (result.capacity, result.offered) == (2, 2), result
    (entry,) = fleet.listed()
    # When a requester buys it from the orderbook
    deal = fleet.buy(entry, 2)
    taskids = [t["chainTaskId"] for t in _wait_tasks(pool, deal, 2)]
    # Then the pool computes both tasks, and the order is filled
    pool.wait_tasks(taskids, lambda d: d.get("status") == "COMPLETED", timeout=120)
    assert fleet.listed() == []
    assert OrderStore(pool.store.db).get(entry["orderHash"])["status"] == "filled"  # type: ignore[index]
    # And once the worker reports its slots free, the policy sells them again
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = replenisher.replenish()
        if result.published:
            break
        time.sleep(0.5)
    assert result.offered == 2, result


def _wait_tasks(pool: RunningPool, dealid: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = list(pool.store.tasks.find({"chainDealId": dealid}, {"_id": 0}))
        if len(tasks) == count:
            return tasks
        time.sleep(0.2)
    raise AssertionError(f"the scheduler did not store the {count} tasks of {dealid}")


def test_a_bad_order_setting_is_reported_not_raised(fleet: Fleet) -> None:
    fleet.worker("0xa", slots=2, busy=0)
    report = TickReport()
    result = fleet.replenisher(order_tag="sgx").replenish(report)
    assert result.published == [] and "WORKERPOOL_ORDER_TAG='sgx'" in report.errors[0]
    # a TEE tag the pool runs no enclave for: refused with the reason, nothing published,
    # even with nodes claiming that capability
    fleet.worker("0xtee", slots=2, busy=0, capabilities=("tee-scone",))
    result = fleet.replenisher(order_tag="tee,scone", order_trust=1).replenish(report)
    assert result.published == []
    assert "tee,scone is a TEE tag, and this pool runs no scone enclave" in result.errors[0]
    assert "(WORKERPOOL_TEE_STACK is empty)" in result.errors[0]


def test_gpu_capacity_is_sold_while_gpu_nodes_are_alive_and_withdrawn_after(
    fleet: Fleet,
) -> None:
    fleet.worker("0xa", slots=4, busy=0)  # standard only: no GPU capacity
    assert fleet.replenisher(order_tag="gpu", replenish_orders=1).replenish().published == []
    fleet.worker("0xgpu", slots=2, busy=0, capabilities=("standard", "gpu"))
    result = fleet.replenisher().replenish()
    assert result.errors == [] and result.capacity == 2 and len(result.published) == 1
    (entry,) = fleet.listed()
    assert entry["order"]["tag"] == "0x" + "00" * 30 + "0100" and entry["remaining"] == 2
    fleet.worker("0xgpu", slots=2, busy=0, capabilities=("standard", "gpu"), status="LOST")
    result = fleet.replenisher().replenish()
    assert result.withdrawn == [entry["orderHash"]] and fleet.listed() == []


def test_tdx_capacity_is_sold_with_trust_1_only_when_the_pool_runs_tdx(fleet: Fleet) -> None:
    fleet.worker("0xtdx", slots=3, busy=0, capabilities=("standard", "tee-tdx"))
    # without tdx in the stack: refused with the reason, nothing published
    result = fleet.replenisher(order_tag="tee,tdx", order_trust=1, replenish_orders=1).replenish()
    assert result.published == [] and "(WORKERPOOL_TEE_STACK is empty)" in result.errors[0]
    tdx = {
        "tee_stack": ("tdx",),
        "sms_tdx_url": "http://sms.example",
        "result_proxy_url": "http://result-proxy.example",
        "order_tag": "tee,tdx",
        "replenish_orders": 1,
    }
    # with it, a TEE order must have trust 1
    result = fleet.replenisher(**tdx, order_trust=0).replenish()
    assert result.published == [] and "needs trust 1, got 0" in result.errors[0]
    result = fleet.replenisher(**tdx, order_trust=1).replenish()
    assert result.errors == [] and result.capacity == 3 and len(result.published) == 1
    (entry,) = fleet.listed()
    assert entry["order"]["tag"] == "0x" + "00" * 31 + "09" and entry["order"]["trust"] == 1
    # only TDX nodes count: when the TDX node is gone, the order is withdrawn
    fleet.worker("0xtdx", slots=3, busy=0, capabilities=("standard", "tee-tdx"), status="LOST")
    fleet.worker("0xstd", slots=8, busy=0)
    result = fleet.replenisher().replenish()
    assert result.withdrawn == [entry["orderHash"]] and fleet.listed() == []
