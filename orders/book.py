"""Workerpool orders: preflight checks, the pool's orderbook (Mongo) and its sync with the chain.

An operator sells the pool's capacity with signed workerpool orders (EIP-712, signed by the
workerpool owner = the scheduler wallet). This module holds everything the three users of
orders share, so the CLI, the API and the scheduler's replenish policy apply the same rules:

* **preflight checks** (:func:`check_terms`, :func:`check_order`, :func:`check_fleet`): tag,
  trust, volume, category, owner, signature, and whether the fleet serves the tag (a TEE tag
  only for a framework of WORKERPOOL_TEE_STACK, GPU only while live GPU nodes exist). They
  raise :class:`PreflightError` naming the field, because an order that fails them would be
  refused by PoCo's ``matchOrders`` much later, with a bare revert code, when a requester
  tries to buy it, or sold capacity the nodes cannot serve;
* **the orderbook** (:class:`Orderbook` over :class:`OrderStore`): publish / unpublish / query,
  with the iExec market's publication rules (at most ``WORKERPOOL_ORDERBOOK_MAX_OPEN`` open
  orders per signer, the owner's stake must cover 30 % of price * remaining volume of all of
  its open orders) and its challenge-based authorization (:meth:`Orderbook.challenge`,
  :meth:`Orderbook.authorize`);
* **the sync** (:func:`sync_orders`): an order's status follows the chain, read from
  ``ClosedWorkerpoolOrder`` and ``OrdersMatched`` logs and ``viewConsumed``, never from what a
  client says.

Statuses: ``open`` (published, listed), ``unpublished`` (withdrawn from the orderbook, **still
valid on chain** until cancelled), ``filled`` (volume consumed by deals), ``cancelled`` (closed on
chain with ``manageWorkerpoolOrder(CLOSE)``), ``dead`` (the pool can no longer honour it: its
signer lost the workerpool, or the owner's stake no longer covers it). ``filled`` and
``cancelled`` are final; ``unpublished`` and ``dead`` orders may be published again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import is_address, to_checksum_address
from web3.exceptions import Web3Exception

from orders.challenge import challenge_typed_data
from orders.rules import (
    TRACKED,
    UNPUBLISH_LAST,
    UNPUBLISH_ORDERHASH,
    UNPUBLISH_TARGETS,
    WORKERPOOL_STAKE_RATIO,
    AuthError,
    Conflict,
    NotFound,
    OrderbookError,
    OrderStatus,
    PreflightError,
    check_fleet,
    check_order,
    check_terms,
    parse_order,
    required_stake,
)
from orders.store import OrderStore, entry
from orders.sync import FULL_SYNC_PERIOD, SyncReport, cursor_key, sync_orders
from poco.chain import ChainClient
from poco.errors import PocoError
from poco.funds import format_rlc
from poco.orders import ZERO_ADDRESS
from pool.clock import utcnow
from pool.settings import Settings
from pool.store import Store

log = logging.getLogger(__name__)


# Page sizes of the market API (config.js: defaultPageSize, minPageSize, maxPageSize).
DEFAULT_PAGE_SIZE = 20
MIN_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000


# ---- queries ----------------------------------------------------------------------------------
ANY = "any"


@dataclass
class OrderQuery:
    """The market API's filters of ``GET /workerpoolorders`` (addresses lower-case)."""

    category: int | None = None
    workerpool: str | None = None  # an address or "any"
    workerpool_owner: str | None = None
    app: str | None = None
    is_app_strict: bool = False
    dataset: str | None = None
    is_dataset_strict: bool = False
    requester: str | None = None
    is_requester_strict: bool = False
    min_tag: int | None = None
    max_tag: int | None = None
    min_trust: int | None = None
    min_volume: int | None = None
    page: int | None = None  # legacy: an offset
    page_index: int | None = None
    page_size: int | None = None

    def mongo(self) -> dict[str, Any]:
        query: dict[str, Any] = {"status": str(OrderStatus.OPEN)}
        if self.category is not None:
            query["order.category"] = self.category
        if self.workerpool and self.workerpool != ANY:
            query["keys.workerpool"] = self.workerpool
        if self.workerpool_owner:
            query["keys.signer"] = self.workerpool_owner
        for name, value, strict in (
            ("apprestrict", self.app, self.is_app_strict),
            ("datasetrestrict", self.dataset, self.is_dataset_strict),
            ("requesterrestrict", self.requester, self.is_requester_strict),
        ):
            if value == ANY:
                continue
            if value:
                query[f"keys.{name}"] = value if strict else {"$in": [ZERO_ADDRESS, value]}
            else:
                query[f"keys.{name}"] = ZERO_ADDRESS
        if self.min_trust is not None and self.min_trust > 1:  # trust 0 and 1 are the same
            query["order.trust"] = {"$gte": self.min_trust}
        if self.min_volume:
            query["remaining"] = {"$gte": self.min_volume}
        clauses = []
        if self.min_tag:
            clauses.append({"tagArray": {"$all": _bits(self.min_tag)}})
        if self.max_tag is not None:
            allowed = set(_bits(self.max_tag))
            clauses.append({"tagArray": {"$nin": [b for b in range(256) if b not in allowed]}})
        if len(clauses) == 1:
            query.update(clauses[0])
        elif clauses:
            query["$and"] = clauses
        return query

    def window(self) -> tuple[int, int]:
        """(skip, limit) as the market computes them (pageIndex/pageSize, or legacy page)."""
        if self.page_index is not None or self.page_size is not None:
            limit = self.page_size or DEFAULT_PAGE_SIZE
            return limit * (self.page_index or 0), limit
        return self.page or 0, DEFAULT_PAGE_SIZE


def _bits(value: int) -> list[int]:
    return [bit for bit in range(256) if value >> bit & 1]


def live_nodes_of(store: Store, settings: Settings) -> Callable[[str], int]:
    """Live worker nodes serving a capability: ALIVE, heard from within WORKER_LOST_TIMEOUT."""

    def count(capability: str) -> int:
        since = utcnow() - dt.timedelta(seconds=settings.worker_lost_timeout)
        return store.count_live(capability, since)

    return count


# ---- does the owner's stake cover its orders? -------------------------------------------------
@dataclass(frozen=True)
class StakeCoverage:
    """The workerpool owner's free stake against the pool stake (30 % of the price per task)
    that matching the remaining volume of its published orders would lock."""

    owner: str
    stake: int  # free stake, nRLC
    needed: int  # pool stake of the orders' remaining volume, nRLC
    orders: int
    tasks: int  # their remaining volume

    @property
    def covered(self) -> bool:
        return self.stake >= self.needed

    def warning(self) -> str:
        """One sentence when the stake falls short ("" otherwise)."""
        if self.covered:
            return ""
        return (
            f"the workerpool owner's free stake ({format_rlc(self.stake)} RLC) does not cover "
            f"its {self.orders} published order(s): matching their {self.tasks} remaining "
            f"task(s) locks {format_rlc(self.needed)} RLC ({WORKERPOOL_STAKE_RATIO}% of the "
            f"price per task); requesters cannot buy the rest: deposit "
            f"{format_rlc(self.needed - self.stake)} RLC more (workerpool account deposit)"
        )


def stake_coverage(orders: OrderStore, owner: str, stake: int) -> StakeCoverage:
    """How far ``owner``'s free ``stake`` (``viewAccount(owner).stake``) covers its open
    orders and those the sync set dead (those stay valid on chain: a requester holding one
    finds matchOrders refused)."""
    docs = orders.published_orders(owner)
    needed = sum(
        required_stake(int(d["order"]["workerpoolprice"]), int(d["remaining"])) for d in docs
    )
    tasks = sum(int(d["remaining"]) for d in docs)
    return StakeCoverage(owner, stake, needed, len(docs), tasks)


# ---- the service ------------------------------------------------------------------------------
class Orderbook:
    """Publish, unpublish and query the pool's workerpool orders (the API's and replenish's
    entry point: both go through the same checks and rules)."""

    def __init__(
        self,
        settings: Settings,
        orders: OrderStore,
        client: ChainClient,
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        live_nodes: Callable[[str], int] | None = None,
    ) -> None:
        self.settings = settings
        self.orders = orders
        self.client = client
        self.clock = clock
        # live worker nodes serving a capability (the fleet in the same database by default)
        self.live_nodes = live_nodes or live_nodes_of(Store(orders.db), settings)
        self.pool = str(settings.pool_address) if settings.pool_address else None

    # ---- chain id ---------------------------------------------------------------------------
    @property
    def chain_id(self) -> int:
        return self.client.chain_id

    def check_chain(self, chain_id: int) -> None:
        if chain_id != self.chain_id:
            raise OrderbookError(
                f"chainId {chain_id} is not supported: this orderbook serves chain {self.chain_id}"
            )

    # ---- authorization ----------------------------------------------------------------------
    def challenge(self, address: str) -> dict[str, Any]:
        """The typed data ``address`` must sign to authorize its next mutating call."""
        if not is_address(address):
            raise OrderbookError(f"address: {address!r} is not an address")
        doc = self.orders.challenge_for(
            self.chain_id, address, self.settings.orderbook_challenge_ttl, self.clock()
        )
        return challenge_typed_data(self.chain_id, doc["value"])

    def authorize(self, header: str | None) -> str:
        """Check ``Authorization: <hash>_<signature>_<address>`` and burn its challenge.

        Returns the authorized address. The challenge must exist for that address and chain,
        be unexpired and unused, and the signature must recover to the address.
        """
        if not header:
            raise AuthError("missing Authorization, please first sign a challenge (GET /challenge)")
        parts = header.strip().split("_")
        if len(parts) != 3:
            raise AuthError("Authorization must be <hash>_<signature>_<address>")
        challenge_hash, signature, address = parts
        if not is_address(address) or address.lower() == ZERO_ADDRESS:
            raise AuthError(f"Authorization: {address!r} is not an address")
        doc = self.orders.find_challenge(self.chain_id, challenge_hash, address, self.clock())
        if doc is None:
            raise AuthError("challenge not valid (unknown, used or expired): request a new one")
        typed = challenge_typed_data(self.chain_id, doc["value"])
        try:
            sig = bytes.fromhex(signature.removeprefix("0x"))
            recovered = Account.recover_message(
                encode_typed_data(full_message=typed), signature=sig
            )
        except Exception as exc:  # eth_keys raises several types for a malformed signature
            raise AuthError("the challenge signature does not decode") from exc
        if recovered.lower() != address.lower():
            raise AuthError("failed to verify the challenge signer: addresses mismatch")
        if not self.orders.consume_challenge(doc["_id"]):
            raise AuthError("challenge already used: request a new one")
        return to_checksum_address(address)

    # ---- publication ----------------------------------------------------------------------
    def publish(self, data: Any, authorized: str, *, source: str = "api") -> dict[str, Any]:
        """Check a signed order and list it; returns its orderbook entry."""
        order = parse_order(data)
        if self.pool and order.workerpool.lower() != self.pool.lower():
            raise PreflightError(
                "workerpool", f"this orderbook lists orders of workerpool {self.pool} only"
            )
        check_terms(order, self.settings.tee_stack)
        check_fleet(order, self.live_nodes)
        order_hash = order.hash(self.client.domain())
        existing = self.orders.get(order_hash)
        if existing is not None and existing["status"] == OrderStatus.OPEN:
            raise Conflict(f"order {order_hash} is already published")
        if existing is not None and existing["status"] not in TRACKED:
            raise Conflict(f"order {order_hash} is {existing['status']} on chain")
        checked = check_order(order, self.client, tee_stack=self.settings.tee_stack)
        if authorized.lower() != checked.owner.lower():
            raise OrderbookError(
                f"only the order signer {checked.owner} can publish it "
                f"(the authorization is {authorized}'s)",
                status=403,
            )
        head = self.client.block_number()
        self.orders.init_cursor(cursor_key(self.client), head)
        self.sync(force=True)  # the limits below count open orders: they must be current
        remaining = order.volume - self.client.view_consumed(order_hash)
        if remaining <= 0:
            raise Conflict(
                f"order {order_hash} has no remaining volume on chain "
                "(filled, or cancelled with manageWorkerpoolOrder)"
            )
        open_orders = self.orders.open_orders(signer=checked.owner)
        if len(open_orders) >= self.settings.orderbook_max_open:
            raise Conflict(
                f"maximum of {self.settings.orderbook_max_open} published open workerpoolorders "
                f"reached for wallet {checked.owner}"
            )
        stake = self.client.view_account(checked.owner).stake
        needed = sum(
            required_stake(int(d["order"]["workerpoolprice"]), int(d["remaining"]))
            for d in open_orders
        ) + required_stake(order.workerpoolprice, remaining)
        if stake < needed:
            raise Conflict(
                f"workerpool owner's stake is too low: {stake} nRLC deposited, {needed} nRLC "
                f"needed to cover the workerpool stake ({WORKERPOOL_STAKE_RATIO}% of price * "
                f"remaining volume) of its {len(open_orders)} open order(s) and this one; "
                f"deposit {needed - stake} nRLC more"
            )
        doc = self.orders.save_open(
            checked,
            chain_id=self.chain_id,
            remaining=remaining,
            source=source,
            block=head,
            now=self.clock(),
        )
        log.info(
            "published order %s (%s, %d left at %d nRLC)",
            order_hash,
            source,
            remaining,
            order.workerpoolprice,
        )
        return entry(doc)

    def unpublish(
        self,
        target: str,
        authorized: str,
        *,
        order_hash: str | None = None,
        workerpool: str | None = None,
    ) -> list[str]:
        """Withdraw open orders from the orderbook (they stay valid on chain)."""
        if target not in UNPUBLISH_TARGETS:
            raise OrderbookError(f"target must be one of {', '.join(UNPUBLISH_TARGETS)}")
        if target == UNPUBLISH_ORDERHASH:
            if not order_hash:
                raise OrderbookError("orderHash is required with target unpublish_orderHash")
            doc = self.orders.get(order_hash)
            if doc is None or doc["status"] != OrderStatus.OPEN:
                raise NotFound(f"workerpoolorder with orderHash {order_hash} is not published")
            if doc["keys"]["signer"] != authorized.lower():
                raise OrderbookError(
                    f"only the order signer {doc['signer']} can unpublish it", status=403
                )
            docs = [doc]
        else:
            if not workerpool or not is_address(workerpool):
                raise OrderbookError(f"workerpool is required with target {target}")
            docs = self.orders.open_orders(signer=authorized, workerpool=workerpool)[::-1]
            if not docs:
                raise NotFound(
                    f"no open workerpoolorder published by signer {authorized} for workerpool "
                    f"{to_checksum_address(workerpool)}"
                )
            if target == UNPUBLISH_LAST:
                docs = docs[:1]
        done = []
        for doc in docs:
            if self.orders.set_status(
                doc["orderHash"], OrderStatus.UNPUBLISHED, note=f"unpublished by {authorized}"
            ):
                done.append(doc["orderHash"])
        return done

    # ---- reads ------------------------------------------------------------------------------
    def get(self, order_hash: str) -> dict[str, Any]:
        doc = self.orders.get(order_hash)
        if doc is None:
            raise NotFound("workerpoolorder not found")
        return {**entry(doc), "deals": doc.get("deals", [])}

    def search(self, query: OrderQuery) -> dict[str, Any]:
        """``{"count", "orders", "nextPage"?}``: cheapest first, then oldest publication."""
        mongo = query.mongo()
        skip, limit = query.window()
        count, docs = self.orders.search(mongo, skip, limit)
        out: dict[str, Any] = {"count": count, "orders": [entry(d) for d in docs]}
        if skip + limit < count:
            out["nextPage"] = skip + limit  # an offset, as the market's legacy `page`
        return out

    # ---- sync -------------------------------------------------------------------------------
    def sync(self, force: bool = False) -> SyncReport | None:
        """:func:`sync_orders`, at most once per ``WORKERPOOL_ORDERBOOK_SYNC_INTERVAL`` (unless
        ``force``); every open order's volume is re-read at most once per
        :data:`FULL_SYNC_PERIOD`, the logs tell which ones changed in between."""
        now = self.clock()
        state = self.orders.sync_state(cursor_key(self.client)) or {}

        def age(name: str) -> float:
            moment = state.get(name)
            return float("inf") if moment is None else (now - moment).total_seconds()

        if not force and age("syncedAt") < float(self.settings.orderbook_sync_interval):
            return None
        full = age("fullSyncAt") >= FULL_SYNC_PERIOD
        report = sync_orders(self.orders, self.client, now=now, full=full)
        if report.filled or report.cancelled or report.dead or report.matched:
            log.info(
                "orders synced to block %d: %d deal(s), filled %s, cancelled %s, dead %s",
                report.head,
                report.matched,
                report.filled,
                report.cancelled,
                report.dead,
            )
        return report

    def try_sync(self) -> None:
        """A sync for readers: a chain that does not answer leaves the stored view as is."""
        try:
            self.sync()
        except (PocoError, Web3Exception, OSError) as exc:
            log.warning("orders not synced with the chain (serving stored state): %s", exc)
