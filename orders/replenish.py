"""The replenish policy: keep the pool's capacity on sale, no more and no less.

With ``WORKERPOOL_REPLENISH_ORDERS=N`` (N ≥ 1) each scheduler tick:

1. syncs order statuses with the chain (:meth:`orders.book.Orderbook.sync`, throttled);
2. measures **capacity**: the free slots of ALIVE workers heard from within
   ``WORKER_LOST_TIMEOUT`` that serve the order's queue (``slots - busySlots`` from their
   heartbeats), minus the replicates already sold and waiting for a slot (tasks not yet
   planned, jobs queued but not yet granted), divided by the replicates one task of the
   order's trust needs;
3. compares it with what is **offered**: the remaining volume of the open orders this policy
   published (orders published by hand are never touched);
4. when the fleet cannot serve an order any more (capacity below what the others offer), it
   withdraws it, newest first: unpublished, or closed on chain with
   ``WORKERPOOL_REPLENISH_CANCEL=true`` (an unpublished order stays valid on chain);
5. when capacity exceeds the offer and fewer than N orders are open, it signs and publishes
   new ones at ``WORKERPOOL_ORDER_PRICE`` (with the other ``WORKERPOOL_ORDER_*`` terms) whose
   volumes share the difference, capped by what the owner's stake can cover.

Orders go through :class:`~orders.book.Orderbook` like any publication, so they obey the same
checks and limits; a refusal is reported, never raised into the tick.

The scheduler keeps one :class:`Replenisher` and runs ``replenish(report)`` as the last step
of its tick (``scheduler/service.py``): it does nothing when the policy is off, appends
refusals to ``report.errors`` and returns a :class:`ReplenishResult`.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from orders.book import Orderbook
from orders.rules import (
    UNPUBLISH_ORDERHASH,
    OrderbookError,
    OrderStatus,
    check_terms,
    required_stake,
    template_from_settings,
)
from orders.store import OrderStore
from poco import actions
from poco.chain import ChainClient, Wallet
from poco.consensus import replicates_needed
from poco.errors import PocoError
from poco.orders import WorkerpoolOrder, random_salt
from pool.clock import utcnow
from pool.messages import queue_for_tag
from pool.settings import Settings, SettingsError
from pool.states import TaskStatus
from pool.store import Store

log = logging.getLogger(__name__)

SOURCE = "replenish"
NOT_PLANNED = (TaskStatus.RECEIVED, TaskStatus.INITIALIZING, TaskStatus.INITIALIZED)
PLANNED = (TaskStatus.RUNNING, TaskStatus.REOPENED)


@dataclass
class ReplenishResult:
    enabled: bool = True
    free_slots: int = 0
    backlog: int = 0
    capacity: int = 0  # tasks of the order's trust the fleet can start now
    offered: int = 0  # remaining volume of the policy's open orders, after this step
    published: list[str] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Replenisher:
    """Keeps ``WORKERPOOL_REPLENISH_ORDERS`` orders published, sized to free capacity."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: ChainClient,
        wallet: Wallet,
    ) -> None:
        self.settings = settings
        self.store = store
        self.client = client
        self.wallet = wallet
        self.orders = OrderStore(store.db)
        self.book = Orderbook(settings, self.orders, client)
        self._indexed = False

    # ---- capacity ----------------------------------------------------------------------------
    def free_slots(self, capability: str) -> int:
        """Idle slots of live workers that serve ``capability`` (their last heartbeat)."""
        fresh = utcnow() - dt.timedelta(seconds=self.settings.worker_lost_timeout)
        return self.store.free_slots(capability, fresh)

    def backlog(self, queue: str) -> int:
        """Replicates sold on ``queue`` that no worker has taken yet."""
        return self.store.backlog(queue, NOT_PLANNED, PLANNED)

    # ---- the step ----------------------------------------------------------------------------
    def replenish(self, report: Any = None) -> ReplenishResult:
        """One step of the policy (see the module docstring)."""
        if self.settings.replenish_orders < 1:
            return ReplenishResult(enabled=False)
        if not self._indexed:
            self.orders.ensure_indexes()
            self._indexed = True
        result = ReplenishResult()
        try:
            self._step(result)
        except (OrderbookError, PocoError, SettingsError) as exc:
            result.errors.append(str(exc))
        for error in result.errors:
            log.warning("replenish: %s", error)
            if report is not None and hasattr(report, "errors"):
                report.errors.append(f"replenish: {error}")
        if result.published or result.withdrawn:
            log.info(
                "replenish: capacity %d task(s), published %s, withdrew %s, offering %d",
                result.capacity,
                result.published,
                result.withdrawn,
                result.offered,
            )
        return result

    def _step(self, result: ReplenishResult) -> None:
        self.book.sync()
        template = template_from_settings(self.settings)
        # a TEE tag the pool cannot run is refused here, with the reason (a GPU tag without
        # live GPU nodes simply has no capacity: its orders are withdrawn below)
        check_terms(template, self.settings.tee_stack)
        queue = queue_for_tag(template.tag)
        per_task = replicates_needed(template.trust)
        result.free_slots = self.free_slots(queue.removeprefix("replicates."))
        result.backlog = self.backlog(queue)
        result.capacity = max(0, result.free_slots - result.backlog) // per_task
        mine = self.orders.open_orders(workerpool=template.workerpool, source=SOURCE)
        offered = sum(int(d["remaining"]) for d in mine)

        # withdraw what the fleet can no longer serve, newest first, keeping an order as long
        # as the older ones do not already cover the capacity
        while mine and offered - int(mine[-1]["remaining"]) >= result.capacity:
            doc = mine.pop()
            self._withdraw(doc)
            result.withdrawn.append(doc["orderHash"])
            offered -= int(doc["remaining"])

        wanted = min(result.capacity - offered, self._stake_room(template.workerpoolprice))
        missing = self.settings.replenish_orders - len(mine)
        if wanted > 0 and missing > 0:
            count = min(missing, wanted)
            for i in range(count):
                volume = wanted // count + (1 if i < wanted % count else 0)
                order = replace(template, volume=volume, salt=random_salt(), sign="0x")
                signed = order.signed(self.wallet.account.key, self.client.domain())
                try:
                    published = self.book.publish(
                        signed.to_dict(), self.wallet.address, source=SOURCE
                    )
                except OrderbookError as exc:
                    result.errors.append(f"publishing {volume} task(s): {exc.message}")
                    break
                result.published.append(published["orderHash"])
                offered += volume
        result.offered = offered

    def _stake_room(self, price: int) -> int:
        """Tasks at ``price`` the owner's free stake can still back, beside its open orders."""
        per_task = required_stake(price, 1)
        if per_task == 0:
            return 1 << 62
        owner = self.wallet.address
        stake = self.client.view_account(owner).stake
        committed = sum(
            required_stake(int(d["order"]["workerpoolprice"]), int(d["remaining"]))
            for d in self.orders.open_orders(signer=owner)
        )
        return max(0, (stake - committed) // per_task)

    def _withdraw(self, doc: dict[str, Any]) -> None:
        order_hash = doc["orderHash"]
        if self.settings.replenish_cancel:
            order = WorkerpoolOrder.from_dict(doc["order"])
            receipt = actions.manage_order(self.wallet, order, actions.CLOSE)
            self.orders.set_status(
                order_hash,
                OrderStatus.CANCELLED,
                note="closed on chain by the replenish policy: no capacity left",
                extra={"remaining": 0, "closedTx": receipt.tx_hash},
            )
            return
        self.book.unpublish(UNPUBLISH_ORDERHASH, self.wallet.address, order_hash=order_hash)
