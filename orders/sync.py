"""The sync: an order's status follows the chain, read from ``ClosedWorkerpoolOrder`` and
``OrdersMatched`` logs and ``viewConsumed``, never from what a client says."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from orders.rules import OrderStatus, required_stake
from orders.store import OrderStore
from poco.chain import ChainClient, _hex32
from pool.clock import utcnow

log = logging.getLogger(__name__)

# Seconds between two syncs that re-read every open order's viewConsumed (see sync_orders).
FULL_SYNC_PERIOD = 60.0


# ---- the sync ------------------------------------------------------------------------------
@dataclass
class SyncReport:
    head: int = 0
    matched: int = 0
    filled: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    updated: int = 0


def cursor_key(client: ChainClient) -> str:
    return f"orders:{client.hub_address.lower()}"


def _hex(value: Any) -> str:
    return "0x" + bytes(value).hex()


def view_consumed_at(client: ChainClient, order_hash: str, block: int) -> int:
    """viewConsumed at ``block``, so one sync reads logs and volumes at the same height."""
    raw = _hex32(order_hash)
    return client.rpc(
        "viewConsumed",
        lambda: int(client.hub.functions.viewConsumed(raw).call(block_identifier=block)),
    )


def sync_orders(
    order_store: OrderStore,
    client: ChainClient,
    *,
    now: dt.datetime | None = None,
    full: bool = True,
) -> SyncReport:
    """Bring every order whose fate is still open in line with the chain, up to the head.

    1. ``ClosedWorkerpoolOrder`` logs since the cursor: those orders are ``cancelled``
       (read before volumes: a close sets viewConsumed to the volume, like a fill would);
    2. ``OrdersMatched`` logs: the deals are recorded on their order;
    3. ``viewConsumed`` (at the same block) gives ``remaining`` of the orders just matched,
       and with ``full`` of every open order; 0 left is ``filled``. Only a match or a close
       changes it, and both leave a log, so a partial sync costs a few calls whatever the
       number of orders; the full one is the safety net (a reorg, a node that lost logs);
    4. open orders whose signer no longer owns the workerpool, or that the owner's stake no
       longer covers (oldest publication first, as the publication rule counts), are ``dead``.

    Idempotent: two processes syncing at once write the same thing. Raises PocoError when the
    chain does not answer (the caller decides whether stale data may be served).
    """
    now = now or utcnow()
    report = SyncReport(head=client.block_number())
    head = report.head
    key = cursor_key(client)
    state = order_store.sync_state(key)
    start = head + 1 if state is None else int(state["block"]) + 1
    tracked = {d["orderHash"]: d for d in order_store.tracked()}
    touched: set[str] = set()
    if tracked and start <= head:
        for log_entry in client.get_logs("ClosedWorkerpoolOrder", start, head):
            order_hash = _hex(log_entry["args"]["workerpoolHash"])
            if order_hash in tracked and order_store.set_status(
                order_hash,
                OrderStatus.CANCELLED,
                note=f"closed on chain (block {log_entry['blockNumber']})",
                extra={"remaining": 0, "closedTx": _hex(log_entry["transactionHash"])},
                now=now,
            ):
                report.cancelled.append(order_hash)
                log.info("order %s cancelled on chain", order_hash)
        for log_entry in client.get_logs("OrdersMatched", start, head):
            order_hash = _hex(log_entry["args"]["workerpoolHash"])
            if order_hash not in tracked:
                continue
            order_store.add_deal(
                order_hash,
                {
                    "dealid": _hex(log_entry["args"]["dealid"]),
                    "volume": int(log_entry["args"]["volume"]),
                    "block": int(log_entry["blockNumber"]),
                    "txHash": _hex(log_entry["transactionHash"]),
                },
            )
            touched.add(order_hash)
            report.matched += 1
    for order_hash, doc in tracked.items():
        if order_hash in report.cancelled:
            continue
        if order_hash not in touched and not (full and doc["status"] == OrderStatus.OPEN):
            continue
        remaining = max(0, int(doc["order"]["volume"]) - view_consumed_at(client, order_hash, head))
        if remaining == 0:
            if order_store.set_status(
                order_hash,
                OrderStatus.FILLED,
                note="volume consumed",
                extra={"remaining": 0},
                now=now,
            ):
                report.filled.append(order_hash)
        elif remaining != doc["remaining"]:
            order_store.set_remaining(order_hash, remaining)
            report.updated += 1
    report.dead = _kill_uncovered(order_store, client, now)
    order_store.advance_cursor(key, head, now, full=full)
    return report


def _kill_uncovered(order_store: OrderStore, client: ChainClient, now: dt.datetime) -> list[str]:
    dead: list[str] = []
    by_owner: dict[str, list[dict[str, Any]]] = {}
    owners: dict[str, str] = {}
    for doc in order_store.open_orders():
        workerpool = doc["order"]["workerpool"]
        if workerpool not in owners:
            owners[workerpool] = client.workerpool_owner(workerpool)
        owner = owners[workerpool]
        if owner.lower() != doc["keys"]["signer"]:
            if order_store.set_status(
                doc["orderHash"],
                OrderStatus.DEAD,
                note=f"signer {doc['signer']} no longer owns workerpool {workerpool} ({owner})",
                now=now,
            ):
                dead.append(doc["orderHash"])
            continue
        by_owner.setdefault(owner, []).append(doc)
    for owner, docs in by_owner.items():
        stake = client.view_account(owner).stake
        needed = 0
        for doc in docs:  # oldest first: the newest orders are the ones left uncovered
            needed += required_stake(int(doc["order"]["workerpoolprice"]), int(doc["remaining"]))
            if needed > stake and order_store.set_status(
                doc["orderHash"],
                OrderStatus.DEAD,
                note=f"owner stake {stake} nRLC no longer covers {needed} nRLC of open orders",
                now=now,
            ):
                dead.append(doc["orderHash"])
                needed -= required_stake(
                    int(doc["order"]["workerpoolprice"]), int(doc["remaining"])
                )
    return dead
