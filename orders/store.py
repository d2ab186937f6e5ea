"""The orderbook's MongoDB collections: orders with their statuses, login challenges, and
the sync's cursor. Every status write is conditional on the statuses allowed to lead to it."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from orders.challenge import CHALLENGE_TEXT, challenge_typed_data, random_text, typed_data_hash
from orders.rules import TRACKED, CheckedOrder, Conflict, OrderStatus
from poco.tags import tag_to_int
from pool.clock import iso, utcnow

log = logging.getLogger(__name__)


# statuses an order may leave for each one (checked atomically on every status write)
_FROM: dict[OrderStatus, tuple[OrderStatus, ...]] = {
    OrderStatus.OPEN: (OrderStatus.UNPUBLISHED, OrderStatus.DEAD),  # (re)publication
    OrderStatus.UNPUBLISHED: (OrderStatus.OPEN,),
    OrderStatus.DEAD: (OrderStatus.OPEN,),
    OrderStatus.FILLED: (OrderStatus.OPEN, OrderStatus.UNPUBLISHED, OrderStatus.DEAD),
    OrderStatus.CANCELLED: (OrderStatus.OPEN, OrderStatus.UNPUBLISHED, OrderStatus.DEAD),
}


NEWEST = [("publishedNs", pymongo.DESCENDING), ("orderHash", pymongo.ASCENDING)]


# ---- the store ---------------------------------------------------------------------------------
class OrderStore:
    """The orderbook's three collections, beside the scheduler's in the same database.

    ``workerpoolorders`` (one document per order hash), ``orderbook_challenges`` (one-time
    login challenges, removed by a TTL index once expired), ``orderbook_sync`` (the chain
    cursor of :func:`sync_orders`). Queries use plain operators only (mongomock in tests).
    """

    def __init__(self, db: Database[Any]) -> None:
        self.db = db
        self.orders: Collection[Any] = db["workerpoolorders"]
        self.challenges: Collection[Any] = db["orderbook_challenges"]
        self.state: Collection[Any] = db["orderbook_sync"]

    def ensure_indexes(self) -> None:
        self.orders.create_index("orderHash", unique=True)
        self.orders.create_index(
            [
                ("status", 1),
                ("order.workerpoolprice", 1),
                ("publicationTimestamp", 1),
                ("orderHash", 1),
            ]
        )
        self.orders.create_index([("keys.signer", 1), ("status", 1)])
        self.orders.create_index([("keys.workerpool", 1), ("status", 1)])
        self.challenges.create_index([("hash", 1), ("address", 1)])
        self.challenges.create_index([("address", 1), ("chainId", 1)])
        self.challenges.create_index("expiresAt", expireAfterSeconds=0)

    # ---- orders ----------------------------------------------------------------------------
    def get(self, order_hash: str) -> dict[str, Any] | None:
        return self.orders.find_one({"orderHash": order_hash.lower()}, {"_id": 0})

    def open_orders(
        self, *, signer: str | None = None, workerpool: str | None = None, source: str | None = None
    ) -> list[dict[str, Any]]:
        """Open orders, oldest publication first."""
        query: dict[str, Any] = {"status": str(OrderStatus.OPEN)}
        if signer:
            query["keys.signer"] = signer.lower()
        if workerpool:
            query["keys.workerpool"] = workerpool.lower()
        if source:
            query["source"] = source
        cursor = self.orders.find(query, {"_id": 0}).sort([("publishedNs", 1), ("orderHash", 1)])
        return list(cursor)

    def published_orders(self, signer: str) -> list[dict[str, Any]]:
        """The signer's open orders, and those the sync found dead (their signer no longer
        owns the pool, or its stake no longer covers them: still valid on chain)."""
        query = {
            "keys.signer": signer.lower(),
            "status": {"$in": [str(OrderStatus.OPEN), str(OrderStatus.DEAD)]},
        }
        return list(self.orders.find(query, {"_id": 0, "timeline": 0}))

    def tracked(self) -> list[dict[str, Any]]:
        """Orders whose fate on chain is still open (the sync watches them), without their
        timelines."""
        return list(
            self.orders.find(
                {"status": {"$in": [str(s) for s in TRACKED]}},
                {"_id": 0, "orderHash": 1, "status": 1, "order": 1, "remaining": 1},
            )
        )

    def search(
        self, query: dict[str, Any], skip: int, limit: int
    ) -> tuple[int, list[dict[str, Any]]]:
        """The market's order search: how many match ``query``, and the page of them,
        cheapest first, then oldest publication."""
        count = int(self.orders.count_documents(query))
        cursor = (
            self.orders.find(query, {"_id": 0})
            .sort(
                [
                    ("order.workerpoolprice", pymongo.ASCENDING),
                    ("publicationTimestamp", pymongo.ASCENDING),
                    ("orderHash", pymongo.ASCENDING),
                ]
            )
            .skip(skip)
            .limit(limit)
        )
        return count, list(cursor)

    def count(self, statuses: list[str] | None = None) -> int:
        query = {} if statuses is None else {"status": {"$in": statuses}}
        return int(self.orders.count_documents(query))

    def newest(
        self, statuses: list[str] | None = None, skip: int = 0, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Orders (in ``statuses``, when given), newest publication first, without their
        timelines: the operator's view."""
        query = {} if statuses is None else {"status": {"$in": statuses}}
        cursor = self.orders.find(query, {"_id": 0, "timeline": 0}).sort(NEWEST)
        return list(cursor.skip(skip).limit(limit))

    def save_open(
        self,
        checked: CheckedOrder,
        *,
        chain_id: int,
        remaining: int,
        source: str,
        block: int,
        now: dt.datetime,
    ) -> dict[str, Any]:
        """Insert the order as open, or reopen an unpublished/dead one; Conflict otherwise."""
        order = checked.order
        event = {"status": str(OrderStatus.OPEN), "at": now, "note": f"published ({source})"}
        fields = {
            "status": str(OrderStatus.OPEN),
            "remaining": remaining,
            "publicationTimestamp": iso(now),
            "publicationBlock": block,
            "publishedNs": time.time_ns(),  # orders publications within one millisecond
            "source": source,
            "updatedAt": now,
        }
        doc = self.orders.find_one_and_update(
            {
                "orderHash": checked.order_hash,
                "status": {"$in": [str(s) for s in _FROM[OrderStatus.OPEN]]},
            },
            {"$set": fields, "$push": {"timeline": event}},
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        if doc is not None:
            return dict(doc)
        tag = tag_to_int(order.tag)
        new = {
            "orderHash": checked.order_hash,
            "chainId": chain_id,
            "order": order.to_dict(),
            "signer": checked.owner,
            "keys": {
                "workerpool": order.workerpool.lower(),
                "signer": checked.owner.lower(),
                "apprestrict": order.apprestrict.lower(),
                "datasetrestrict": order.datasetrestrict.lower(),
                "requesterrestrict": order.requesterrestrict.lower(),
            },
            "tagArray": [bit for bit in range(256) if tag >> bit & 1],
            "deals": [],
            "createdAt": now,
            "timeline": [event],
            **fields,
        }
        try:
            self.orders.insert_one(new)
        except DuplicateKeyError as exc:
            current = self.get(checked.order_hash) or {}
            raise Conflict(
                f"order {checked.order_hash} is already {current.get('status', 'published')}"
            ) from exc
        new.pop("_id", None)
        return new

    def set_status(
        self,
        order_hash: str,
        new: OrderStatus,
        *,
        note: str = "",
        extra: Mapping[str, Any] | None = None,
        now: dt.datetime | None = None,
    ) -> dict[str, Any] | None:
        """Move an order to ``new`` if its current status allows it; None when it does not."""
        now = now or utcnow()
        event: dict[str, Any] = {"status": str(new), "at": now}
        if note:
            event["note"] = note
        doc = self.orders.find_one_and_update(
            {"orderHash": order_hash, "status": {"$in": [str(s) for s in _FROM[new]]}},
            {
                "$set": {**(extra or {}), "status": str(new), "updatedAt": now},
                "$push": {"timeline": event},
            },
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else dict(doc)

    def set_remaining(self, order_hash: str, remaining: int) -> None:
        self.orders.update_one(
            {"orderHash": order_hash}, {"$set": {"remaining": remaining, "updatedAt": utcnow()}}
        )

    def add_deal(self, order_hash: str, deal: dict[str, Any]) -> None:
        """Record a deal that consumed the order (idempotent: a log read twice adds nothing)."""
        self.orders.update_one(
            {"orderHash": order_hash, "deals.dealid": {"$ne": deal["dealid"]}},
            {"$push": {"deals": deal}},
        )

    # ---- challenges ------------------------------------------------------------------------
    def challenge_for(
        self, chain_id: int, address: str, ttl: float, now: dt.datetime
    ) -> dict[str, Any]:
        """The address's pending challenge, or a new one (as the market: one per address)."""
        key = {"address": address.lower(), "chainId": chain_id}
        current = self.challenges.find_one({**key, "expiresAt": {"$gt": now}}, {"_id": 0})
        if current is not None:
            return dict(current)
        text = CHALLENGE_TEXT + random_text()
        doc = {
            **key,
            "value": text,
            "hash": typed_data_hash(challenge_typed_data(chain_id, text)),
            "createdAt": now,
            "expiresAt": now + dt.timedelta(seconds=ttl),
        }
        self.challenges.insert_one(dict(doc))
        return doc

    def find_challenge(
        self, chain_id: int, challenge_hash: str, address: str, now: dt.datetime
    ) -> dict[str, Any] | None:
        return self.challenges.find_one(
            {
                "hash": challenge_hash.lower(),
                "address": address.lower(),
                "chainId": chain_id,
                "expiresAt": {"$gt": now},
            }
        )

    def consume_challenge(self, doc_id: Any) -> bool:
        """Delete a challenge; True for the one caller that deleted it (single use)."""
        return self.challenges.delete_one({"_id": doc_id}).deleted_count == 1

    # ---- sync state ------------------------------------------------------------------------
    def sync_state(self, key: str) -> dict[str, Any] | None:
        return self.state.find_one({"_id": key})

    def init_cursor(self, key: str, block: int) -> None:
        """Start watching the chain at ``block`` unless already watching (never moves back)."""
        self.state.update_one({"_id": key}, {"$setOnInsert": {"block": block}}, upsert=True)

    def advance_cursor(self, key: str, block: int, now: dt.datetime, full: bool = False) -> None:
        done = {"syncedAt": now, **({"fullSyncAt": now} if full else {})}
        self.state.update_one({"_id": key}, {"$max": {"block": block}, "$set": done}, upsert=True)


def entry(doc: Mapping[str, Any]) -> dict[str, Any]:
    """An order as the market API shows it."""
    return {
        "orderHash": doc["orderHash"],
        "chainId": doc["chainId"],
        "order": doc["order"],
        "remaining": doc["remaining"],
        "status": doc["status"],
        "signer": doc["signer"],
        "publicationTimestamp": doc["publicationTimestamp"],
    }
