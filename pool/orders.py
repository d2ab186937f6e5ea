"""Workerpool orders: preflight checks, the pool's orderbook (Mongo) and its sync with the chain.

An operator sells the pool's capacity with signed workerpool orders (EIP-712, signed by the
workerpool owner = the scheduler wallet). This module holds everything the three users of
orders share, so the CLI, the API and the scheduler's replenish policy apply the same rules:

* **preflight checks** (:func:`check_terms`, :func:`check_order`): tag, trust, volume, category,
  owner, signature. They raise :class:`PreflightError` naming the field, because an order that
  fails them would be refused by PoCo's ``matchOrders`` much later, with a bare revert code,
  when a requester tries to buy it;
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
import secrets
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import pymongo
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import is_address, keccak, to_checksum_address
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError
from web3.exceptions import Web3Exception

from poco.chain import ChainClient, _hex32
from poco.errors import PocoError
from poco.orders import ZERO_ADDRESS, OrderError, WorkerpoolOrder
from poco.tags import TagError, decode_tag, encode_tag, tag_to_int
from pool.settings import SETTINGS, Settings, SettingsError

log = logging.getLogger(__name__)

# ---- protocol constants ---------------------------------------------------------------------
WORKERPOOL_STAKE_RATIO = 30  # PoCo locks price * 30 / 100 per task from the owner at match
ALLOWED_TAGS: dict[int, str] = {0: "standard", 0x3: "tee,scone", 0x5: "tee,gramine"}
TEE_BIT = 1
MONGO_INT_MAX = (1 << 63) - 1  # numbers above it do not fit a BSON int64

# The market API's challenge (iexec-market-api services/auth.js); iExec tooling signs this.
CHALLENGE_DOMAIN_NAME = "iExec Gateway"
CHALLENGE_DOMAIN_VERSION = "1"
CHALLENGE_TEXT = "Sign this message to log into iExec Gateway: "
CHALLENGE_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
]

UNPUBLISH_ORDERHASH = "unpublish_orderHash"
UNPUBLISH_LAST = "unpublish_last"
UNPUBLISH_ALL = "unpublish_all"
UNPUBLISH_TARGETS = (UNPUBLISH_ORDERHASH, UNPUBLISH_LAST, UNPUBLISH_ALL)

# Seconds between two syncs that re-read every open order's viewConsumed (see sync_orders).
FULL_SYNC_PERIOD = 60.0

# Page sizes of the market API (config.js: defaultPageSize, minPageSize, maxPageSize).
DEFAULT_PAGE_SIZE = 20
MIN_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000


class OrderStatus(StrEnum):
    OPEN = "open"
    UNPUBLISHED = "unpublished"
    FILLED = "filled"
    CANCELLED = "cancelled"
    DEAD = "dead"


# statuses an order may leave for each one (checked atomically on every status write)
_FROM: dict[OrderStatus, tuple[OrderStatus, ...]] = {
    OrderStatus.OPEN: (OrderStatus.UNPUBLISHED, OrderStatus.DEAD),  # (re)publication
    OrderStatus.UNPUBLISHED: (OrderStatus.OPEN,),
    OrderStatus.DEAD: (OrderStatus.OPEN,),
    OrderStatus.FILLED: (OrderStatus.OPEN, OrderStatus.UNPUBLISHED, OrderStatus.DEAD),
    OrderStatus.CANCELLED: (OrderStatus.OPEN, OrderStatus.UNPUBLISHED, OrderStatus.DEAD),
}
# orders whose fate on chain is still open: the sync watches them
TRACKED = (OrderStatus.OPEN, OrderStatus.UNPUBLISHED, OrderStatus.DEAD)


# ---- errors -----------------------------------------------------------------------------------
class OrderbookError(Exception):
    """A refusal with the HTTP status the API answers it with; the message is for people."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class PreflightError(OrderbookError):
    """The order itself is wrong (``field`` names what to fix); 403 when it is the signer."""

    def __init__(self, field: str, message: str, status: int = 400) -> None:
        super().__init__(f"{field}: {message}" if field else message, status)
        self.field = field


class AuthError(OrderbookError):
    status = 401


class NotFound(OrderbookError):
    status = 404


class Conflict(OrderbookError):
    """The order is fine but the orderbook's state refuses it (already published, limits)."""

    status = 409


# ---- small helpers ----------------------------------------------------------------------------
def utcnow() -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000, tzinfo=None)


def iso(moment: dt.datetime) -> str:
    """The market's timestamp format (``2024-05-01T12:00:00.000Z``); sorts as it reads."""
    return moment.isoformat(timespec="milliseconds") + "Z"


def required_stake(price: int, volume: int) -> int:
    """What matchOrders locks from the workerpool owner for ``volume`` tasks at ``price``."""
    return price * WORKERPOOL_STAKE_RATIO // 100 * volume


def tag_label(tag: str | int) -> str:
    value = tag_to_int(tag)
    return ALLOWED_TAGS.get(value) or ",".join(decode_tag(value)) or "standard"


def parse_order(data: Any) -> WorkerpoolOrder:
    """A workerpool order from its JSON shape; a malformed field is a PreflightError naming it."""
    try:
        return WorkerpoolOrder.from_dict(data)
    except OrderError as exc:
        text = str(exc)
        name, sep, rest = text.partition(": ")
        if sep and name in {n for n, _ in WorkerpoolOrder.EIP712} | {"sign"}:
            raise PreflightError(name, rest) from exc
        raise PreflightError("order", text) from exc


def template_from_settings(settings: Settings) -> WorkerpoolOrder:
    """The order the pool's settings describe (unsigned, zero salt): ``order init`` and the
    replenish policy start from it."""
    settings.require("pool_address")
    try:
        tag = tag_to_int(settings.order_tag)
    except TagError as exc:
        raise SettingsError(f"{SETTINGS['order_tag'].env}={settings.order_tag!r}: {exc}") from exc
    return WorkerpoolOrder(
        workerpool=str(settings.pool_address),
        workerpoolprice=settings.order_price,
        volume=settings.order_volume,
        tag=encode_tag(tag),
        category=settings.order_category,
        trust=settings.order_trust,
        apprestrict=settings.order_apprestrict,
        datasetrestrict=settings.order_datasetrestrict,
        requesterrestrict=settings.order_requesterrestrict,
    )


# ---- preflight ---------------------------------------------------------------------------------
def check_terms(order: WorkerpoolOrder) -> None:
    """Checks that need no chain: volume, tag, trust, and numbers a store can hold."""
    if order.volume < 1:
        raise PreflightError("volume", f"must be at least 1, got {order.volume}")
    tag = tag_to_int(order.tag)
    if tag not in ALLOWED_TAGS:
        names = ",".join(decode_tag(tag))
        raise PreflightError(
            "tag",
            f"{order.tag} ({names}) is not a tag this pool sells; use standard (0x0…00), "
            "tee,scone (0x0…03) or tee,gramine (0x0…05)",
        )
    if tag & TEE_BIT and order.trust != 1:
        raise PreflightError(
            "trust", f"a TEE order ({ALLOWED_TAGS[tag]}) needs trust 1, got {order.trust}"
        )
    for name in ("workerpoolprice", "volume", "category", "trust"):
        if getattr(order, name) > MONGO_INT_MAX:
            raise PreflightError(name, f"{getattr(order, name)} is too large (max 2^63-1)")


@dataclass(frozen=True)
class CheckedOrder:
    """An order that passed :func:`check_order`, with what the checks learnt."""

    order: WorkerpoolOrder
    order_hash: str
    owner: str


def workerpool_owner(client: ChainClient, workerpool: str) -> str:
    """The owner of a workerpool registered on this chain, or a PreflightError saying why not."""
    registry_address = client.rpc(
        "workerpoolregistry", lambda: str(client.hub.functions.workerpoolregistry().call())
    )
    registry = client.contract("WorkerpoolRegistry", registry_address)
    registered = client.rpc(
        "isRegistered",
        lambda: bool(registry.functions.isRegistered(to_checksum_address(workerpool)).call()),
    )
    if not registered:
        raise PreflightError(
            "workerpool", f"{workerpool} is not a workerpool registered on chain {client.chain_id}"
        )
    return to_checksum_address(client.workerpool_owner(workerpool))


def check_order(
    order: WorkerpoolOrder,
    client: ChainClient,
    *,
    signer: str | None = None,
    signed: bool = True,
) -> CheckedOrder:
    """Every check PoCo would otherwise make at matchOrders time, with a clear message.

    ``signer`` is the wallet about to sign (``order sign``): it must own the workerpool.
    With ``signed``, the signature must verify on chain (``verifySignature``) for the owner.
    """
    check_terms(order)
    count = client.count_category()
    if order.category >= count:
        raise PreflightError(
            "category",
            f"category {order.category} does not exist on chain {client.chain_id} "
            f"(it has {count}: 0 to {count - 1})",
        )
    owner = workerpool_owner(client, order.workerpool)
    if signer is not None and signer.lower() != owner.lower():
        raise PreflightError(
            "signer",
            f"wallet {to_checksum_address(signer)} does not own workerpool {order.workerpool} "
            f"(its owner is {owner}); only the owner's signature is accepted",
            status=403,
        )
    order_hash = order.hash(client.domain())
    if signed:
        verify_order_signature(order, order_hash, owner, client)
    return CheckedOrder(order, order_hash, owner)


def verify_order_signature(
    order: WorkerpoolOrder, order_hash: str, owner: str, client: ChainClient
) -> None:
    """The signature must be the owner's over exactly this order (PoCo's verifySignature)."""
    if order.sign in ("", "0x"):
        raise PreflightError("sign", "the order is not signed (run: workerpool order sign)")
    try:
        valid = client.verify_signature(owner, order_hash, order.sign)
    except (Web3Exception, ValueError):  # malformed bytes make the contract revert
        valid = False
    if valid:
        return
    try:
        recovered: str | None = order.recover_signer(client.domain())
    except OrderError:
        recovered = None
    if recovered is None:
        raise PreflightError("sign", "the signature does not decode (65-byte ECDSA expected)")
    if recovered.lower() != owner.lower():
        raise PreflightError(
            "sign",
            f"the signature does not verify for the workerpool owner {owner}: it recovers to "
            f"{recovered} (signed by another wallet, or the order changed after signing)",
            status=403,
        )
    raise PreflightError("sign", "the signature is refused by the contract's verifySignature")


# ---- the challenge (market API authorization) -------------------------------------------------
def challenge_typed_data(chain_id: int, text: str) -> dict[str, Any]:
    """The EIP-712 typed data of a login challenge, as the iExec market serves it."""
    return {
        "types": {
            "EIP712Domain": CHALLENGE_DOMAIN_TYPE,
            "Challenge": [{"name": "challenge", "type": "string"}],
        },
        "domain": {
            "name": CHALLENGE_DOMAIN_NAME,
            "version": CHALLENGE_DOMAIN_VERSION,
            "chainId": int(chain_id),
        },
        "primaryType": "Challenge",
        "message": {"challenge": text},
    }


def typed_data_hash(typed: Mapping[str, Any]) -> str:
    """The EIP-712 digest (keccak256(0x1901 ‖ domainSeparator ‖ structHash))."""
    sm = encode_typed_data(full_message=dict(typed))
    return "0x" + keccak(b"\x19" + sm.version + sm.header + sm.body).hex()


def authorization_header(typed: Mapping[str, Any], private_key: str | bytes) -> str:
    """``<hash>_<signature>_<address>``: what iExec tooling sends as ``Authorization``."""
    account = Account.from_key(private_key)
    signature = Account.sign_typed_data(private_key, full_message=dict(typed)).signature
    return f"{typed_data_hash(typed)}_0x{bytes(signature).hex()}_{account.address}"


def _random_text(length: int = 32) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


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
        text = CHALLENGE_TEXT + _random_text()
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
    tracked = {
        d["orderHash"]: d
        for d in order_store.orders.find(
            {"status": {"$in": [str(s) for s in TRACKED]}},
            {"_id": 0, "orderHash": 1, "status": 1, "order": 1, "remaining": 1},
        )
    }
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
    ) -> None:
        self.settings = settings
        self.orders = orders
        self.client = client
        self.clock = clock
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
        check_terms(order)
        order_hash = order.hash(self.client.domain())
        existing = self.orders.get(order_hash)
        if existing is not None and existing["status"] == OrderStatus.OPEN:
            raise Conflict(f"order {order_hash} is already published")
        if existing is not None and existing["status"] not in TRACKED:
            raise Conflict(f"order {order_hash} is {existing['status']} on chain")
        checked = check_order(order, self.client)
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
        count = self.orders.orders.count_documents(mongo)
        cursor = (
            self.orders.orders.find(mongo, {"_id": 0})
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
        out: dict[str, Any] = {"count": count, "orders": [entry(d) for d in cursor]}
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
