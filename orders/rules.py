"""The rules of a workerpool order: its statuses, the refusals, and the preflight checks
(tag, trust, volume, category, owner, signature) every user of orders applies before it signs,
sends or spends anything. They raise :class:`PreflightError` naming the field, because an
order that fails them would be refused by PoCo's ``matchOrders`` much later, with a bare
revert code, when a requester tries to buy it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from eth_utils import to_checksum_address
from web3.exceptions import Web3Exception

from poco.chain import ChainClient
from poco.orders import OrderError, WorkerpoolOrder
from poco.tags import (
    TAG_BITS,
    TEE_FRAMEWORK_BITS,
    TagError,
    decode_tag,
    encode_tag,
    tag_to_int,
    tee_framework,
)
from pool.messages import QUEUE_CAPABILITY, queue_for_tag
from pool.settings import SETTINGS, Settings, SettingsError

log = logging.getLogger(__name__)

# ---- protocol constants ---------------------------------------------------------------------
WORKERPOOL_STAKE_RATIO = 30  # PoCo locks price * 30 / 100 per task from the owner at match
GPU_TAG = 1 << TAG_BITS["gpu"]
# every tag a pool may sell: standard, GPU, and one TEE framework (tee + scone, gramine or
# tdx, the one SDK 9 signs); a TEE tag only with that framework in WORKERPOOL_TEE_STACK
ALLOWED_TAGS: dict[int, str] = {
    0: "standard",
    GPU_TAG: "gpu",
    **{bits: f"tee,{name}" for name, bits in TEE_FRAMEWORK_BITS.items()},
}
TEE_BIT = 1

# what an unpublish asks the orderbook to withdraw (the market API's targets)
UNPUBLISH_ORDERHASH = "unpublish_orderHash"
UNPUBLISH_LAST = "unpublish_last"
UNPUBLISH_ALL = "unpublish_all"
UNPUBLISH_TARGETS = (UNPUBLISH_ORDERHASH, UNPUBLISH_LAST, UNPUBLISH_ALL)
MONGO_INT_MAX = (1 << 63) - 1  # numbers above it do not fit a BSON int64


class OrderStatus(StrEnum):
    OPEN = "open"
    UNPUBLISHED = "unpublished"
    FILLED = "filled"
    CANCELLED = "cancelled"
    DEAD = "dead"


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
def check_terms(order: WorkerpoolOrder, tee_stack: tuple[str, ...] = ()) -> None:
    """Checks that need no chain: volume, tag, trust, and numbers a store can hold. A TEE
    tag is sold only for a framework of ``tee_stack`` (WORKERPOOL_TEE_STACK)."""
    if order.volume < 1:
        raise PreflightError("volume", f"must be at least 1, got {order.volume}")
    tag = tag_to_int(order.tag)
    if tag not in ALLOWED_TAGS:
        names = ",".join(decode_tag(tag))
        raise PreflightError(
            "tag",
            f"{order.tag} ({names}) is not a tag this pool sells; use standard (0x0…00), "
            "gpu (0x0…0100), or tee,scone / tee,gramine / tee,tdx (0x0…03 / 0x0…05 / 0x0…09) "
            "for a framework of WORKERPOOL_TEE_STACK",
        )
    framework = tee_framework(tag) if tag & TEE_BIT else None
    if framework is not None and framework not in tee_stack:
        stack = ", ".join(tee_stack) if tee_stack else "empty"
        raise PreflightError(
            "tag",
            f"{ALLOWED_TAGS[tag]} is a TEE tag, and this pool runs no {framework} enclave "
            f"(WORKERPOOL_TEE_STACK is {stack}): a deal bought with it could not run on its "
            "nodes, so it is not sold",
        )
    if tag & TEE_BIT and order.trust != 1:
        raise PreflightError(
            "trust", f"a TEE order ({ALLOWED_TAGS[tag]}) needs trust 1, got {order.trust}"
        )
    for name in ("workerpoolprice", "volume", "category", "trust"):
        if getattr(order, name) > MONGO_INT_MAX:
            raise PreflightError(name, f"{getattr(order, name)} is too large (max 2^63-1)")


def check_fleet(order: WorkerpoolOrder, live_nodes: Callable[[str], int]) -> None:
    """A GPU or TEE order is sold only while live worker nodes serve its queue:
    ``live_nodes(capability)`` counts them (a standard order needs none: the pool's own
    nodes may start after it is published)."""
    queue = queue_for_tag(order.tag)
    capability = QUEUE_CAPABILITY[queue]
    if capability == "standard":
        return
    if live_nodes(capability) < 1:
        raise PreflightError(
            "tag",
            f"{tag_label(order.tag)}: no live worker node serves {capability} tasks (a node "
            f"with {capability} in WORKERPOOL_WORKER_CAPABILITIES): a deal bought now would "
            "wait for one",
        )


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
    tee_stack: tuple[str, ...] = (),
) -> CheckedOrder:
    """Every check PoCo would otherwise make at matchOrders time, with a clear message.

    ``signer`` is the wallet about to sign (``order sign``): it must own the workerpool.
    With ``signed``, the signature must verify on chain (``verifySignature``) for the owner.
    """
    check_terms(order, tee_stack)
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
