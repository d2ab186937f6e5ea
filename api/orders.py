"""``/api/v1/orders``: the pool's workerpool orders and the volume each can still sell.

Read-only, from the orderbook's collection (:class:`orders.book.OrderStore`), whose
statuses and ``remaining`` follow the chain (the orderbook's sync reads ``viewConsumed`` and
the close/match logs). Publishing and unpublishing are the market-compatible routes of
``api/orderbook.py`` and the ``workerpool order`` commands; this is the operator's view of
the same documents, newest first, in the API's own shape and pagination.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.common import choice_arg, paginate
from api.context import ApiContext, ctx
from orders.rules import TRACKED, OrderStatus, tag_label
from orders.store import OrderStore

bp = Blueprint("orders", __name__, url_prefix="/api/v1")


def order_view(doc: dict[str, Any]) -> dict[str, Any]:
    """An order with the terms an operator looks at lifted to the top level."""
    order = doc.get("order") or {}
    tag = order.get("tag")
    try:
        label = tag_label(tag) if tag is not None else None
    except Exception:  # a malformed stored tag must not hide the rest
        label = None
    return {
        "orderHash": doc.get("orderHash"),
        "status": doc.get("status"),
        "volume": order.get("volume"),
        "remaining": doc.get("remaining"),
        "price": order.get("workerpoolprice"),
        "category": order.get("category"),
        "trust": order.get("trust"),
        "tag": tag,
        "tagLabel": label,
        "signer": doc.get("signer"),
        "chainId": doc.get("chainId"),
        "source": doc.get("source"),
        "publicationTimestamp": doc.get("publicationTimestamp"),
        "updatedAt": doc.get("updatedAt"),
        "deals": doc.get("deals", []),
        "order": order,
    }


def order_store(context: ApiContext) -> OrderStore:
    return OrderStore(context.store.db)


def order_rows(context: ApiContext, limit: int = 500) -> list[dict[str, Any]]:
    """Orders still tracked on chain (open, unpublished, dead), for /metrics."""
    live = [str(s) for s in TRACKED]
    return [order_view(doc) for doc in order_store(context).newest(live, limit=limit)]


@bp.get("/orders")
def orders() -> Any:
    book = order_store(ctx())
    status = choice_arg("status", [str(s) for s in OrderStatus])
    statuses = [status] if status else None
    return jsonify(
        paginate(
            lambda: book.count(statuses),
            lambda skip, limit: book.newest(statuses, skip, limit),
            order_view,
        )
    )
