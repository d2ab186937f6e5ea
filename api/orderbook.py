"""The pool's orderbook, shaped like the iExec market API so iExec tooling can use it.

Routes (no prefix, as the market serves them; point the SDK's ``iexecGatewayURL`` here):

* ``GET /challenge?chainId=&address=`` → ``{"ok": true, "data": <EIP-712 typed data>}``
* ``POST /workerpoolorders?chainId=`` ``{"order": <signed order>}`` → ``{"ok", "published"}``
* ``PUT /workerpoolorders?chainId=`` ``{"target": …}`` → ``{"ok", "unpublished": [hashes]}``
* ``GET /workerpoolorders?chainId=&…filters`` → ``{"ok", "count", "orders", "nextPage"?}``
* ``GET /workerpoolorders/<orderHash>?chainId=`` → ``{"ok", "orderHash", "order", …}``

Mutating calls carry ``Authorization: <hash>_<signature>_<address>`` over a challenge from
``/challenge`` (single use, short-lived). Errors are ``{"ok": false, "error": "..."}`` with a
fitting status, whatever the app's own error shape is: market clients read ``error`` as text.

Reads sync order statuses with the chain first (at most once per
``WORKERPOOL_ORDERBOOK_SYNC_INTERVAL``); when the chain does not answer they serve what Mongo
holds. The orderbook writes to Mongo (orders, challenges): its database user needs write
access to those three collections.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from typing import Any

from eth_utils import is_address
from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from orders.book import ANY, MAX_PAGE_SIZE, MIN_PAGE_SIZE, Orderbook, OrderQuery
from orders.rules import UNPUBLISH_ORDERHASH, OrderbookError
from orders.store import OrderStore
from poco.chain import ChainClient
from poco.errors import PocoError, TransportError
from poco.tags import TagError, tag_to_int
from pool.settings import Settings
from pool.store import Store

log = logging.getLogger(__name__)

HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
UINT = re.compile(r"^[0-9]{1,18}$")

StoreSource = Store | Callable[[], Store] | None

# Attribute set on the views that check Authorization themselves. An app-wide guard of
# mutating requests should skip them:
#   view = app.view_functions.get(request.endpoint or "")
#   if getattr(view, SELF_AUTHENTICATED, False): return None
SELF_AUTHENTICATED = "self_authenticated"


class _Lazy:
    """Builds the orderbook on first use: creating the app must not touch Mongo nor the chain."""

    def __init__(self, settings: Settings, store: StoreSource, client: ChainClient | None):
        self.settings = settings
        self.store_source = store
        self.client = client
        self.lock = threading.Lock()
        self.orderbook: Orderbook | None = None

    def _store(self) -> Store:
        source = self.store_source
        if isinstance(source, Store):
            return source
        if callable(source):
            return source()
        # the API's own context (api/context.py) holds the store when the app was built
        # without one; failing that, connect from the settings
        context = current_app.extensions.get("workerpool")
        if context is not None and getattr(context, "store", None) is not None:
            return context.store
        from pool.store import connect

        return connect(self.settings)

    def get(self) -> Orderbook:
        with self.lock:
            if self.orderbook is None:
                if self.client is None:
                    if not (self.settings.chain_rpc_url and self.settings.hub_address):
                        raise OrderbookError(
                            "the orderbook needs the chain: set IEXEC_PRIVATE_CHAIN_ADDRESS "
                            "and IEXEC_HUB_ADDRESS",
                            status=503,
                        )
                    self.client = ChainClient(
                        str(self.settings.chain_rpc_url),
                        str(self.settings.hub_address),
                        request_timeout=self.settings.rpc_timeout,
                        retries=min(self.settings.rpc_retries, 2),
                        log_chunk=self.settings.log_range,
                    )
                orders = OrderStore(self._store().db)
                try:
                    orders.ensure_indexes()
                except Exception as exc:  # a read-only user: serve anyway, say why writes fail
                    log.warning("orderbook indexes not created: %s", exc)
                self.orderbook = Orderbook(self.settings, orders, self.client)
            return self.orderbook


def orderbook_blueprint(
    settings: Settings,
    store: StoreSource = None,
    client: ChainClient | None = None,
    *,
    name: str = "orderbook",
    url_prefix: str | None = None,
) -> Blueprint:
    """The orderbook routes. ``store`` is a Store, a function returning one, or None (the
    app's context or the settings); ``client`` None builds one from the settings on first
    use."""
    bp = Blueprint(name, __name__, url_prefix=url_prefix)
    lazy = _Lazy(settings, store, client)

    def book() -> Orderbook:
        orderbook = lazy.get()
        raw = request.args.get("chainId")
        if raw is None:
            raise OrderbookError("chainId is a required field")
        if not UINT.match(raw):
            raise OrderbookError(f"chainId must be a positive integer, got {raw!r}")
        orderbook.check_chain(int(raw))
        return orderbook

    @bp.errorhandler(OrderbookError)
    def refused(exc: OrderbookError) -> Response:
        return _error(exc.status, exc.message)

    @bp.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return _error(exc.code or 500, exc.description or exc.name)

    @bp.errorhandler(TransportError)
    def chain_down(exc: TransportError) -> Response:
        log.warning("orderbook: chain unreachable: %s", exc)
        return _error(503, "the chain node does not answer, try again later")

    @bp.errorhandler(PocoError)
    def chain_error(exc: PocoError) -> Response:
        log.warning("orderbook: chain error: %s", exc)
        return _error(502, f"chain error: {exc}")

    @bp.errorhandler(Exception)
    def bug(exc: Exception) -> Response:
        log.exception("orderbook: unhandled error")
        return _error(500, "internal error (see the API's log)")

    @bp.get("/challenge")
    def challenge() -> Response:
        orderbook = book()
        address = request.args.get("address")
        if not address:
            raise OrderbookError("address is a required field")
        return jsonify({"ok": True, "data": orderbook.challenge(address)})

    @bp.post("/workerpoolorders")
    def publish() -> Response:
        orderbook = book()
        authorized = orderbook.authorize(request.headers.get("Authorization"))
        body = _json_body()
        if "order" not in body:
            raise OrderbookError("order is a required field")
        published = orderbook.publish(body["order"], authorized)
        return jsonify({"ok": True, "published": published})

    @bp.put("/workerpoolorders")
    def unpublish() -> Response:
        orderbook = book()
        authorized = orderbook.authorize(request.headers.get("Authorization"))
        body = _json_body()
        target = body.get("target", UNPUBLISH_ORDERHASH)
        order_hash = body.get("orderHash")
        if order_hash is not None and not (isinstance(order_hash, str) and HEX32.match(order_hash)):
            raise OrderbookError("orderHash must be a bytes32 hex string")
        workerpool = body.get("workerpool")
        if workerpool is not None and not (isinstance(workerpool, str) and is_address(workerpool)):
            raise OrderbookError("workerpool must be an address")
        hashes = orderbook.unpublish(
            str(target),
            authorized,
            order_hash=order_hash.lower() if order_hash else None,
            workerpool=workerpool,
        )
        return jsonify({"ok": True, "unpublished": hashes})

    # These two authenticate the caller themselves (a one-time challenge signed by the order's
    # signer, in the Authorization header as the market API defines it): an app-wide bearer
    # token check must let them through (see SELF_AUTHENTICATED).
    for view in (publish, unpublish):
        setattr(view, SELF_AUTHENTICATED, True)

    @bp.get("/workerpoolorders")
    def orders() -> Response:
        orderbook = book()
        query = _query()
        orderbook.try_sync()
        return jsonify({"ok": True, **orderbook.search(query)})

    @bp.get("/workerpoolorders/<order_hash>")
    def order(order_hash: str) -> Response:
        orderbook = book()
        if not HEX32.match(order_hash):
            raise OrderbookError("orderHash must be a bytes32 hex string")
        orderbook.try_sync()
        return jsonify({"ok": True, **orderbook.get(order_hash.lower())})

    return bp


def _error(status: int, message: str) -> Response:
    response = jsonify({"ok": False, "error": message})
    response.status_code = status
    return response


def _json_body() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise OrderbookError("the body must be a JSON object")
    return body


def _uint(name: str, low: int = 0, high: int | None = None) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if not UINT.match(raw):
        raise OrderbookError(f"{name} must be a positive integer, got {raw!r}")
    value = int(raw)
    if value < low:
        raise OrderbookError(f"{name} must be greater than or equal to {low}")
    if high is not None and value > high:
        raise OrderbookError(f"{name} must be less than or equal to {high}")
    return value


def _bool(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return False
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise OrderbookError(f"{name} must be a `boolean` type, got {raw!r}")


def _address(name: str, allow_any: bool = True) -> str | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if allow_any and raw.lower() == ANY:
        return ANY
    if not is_address(raw):
        raise OrderbookError(f"{name} must be an address{' or any' if allow_any else ''}")
    return raw.lower()


def _tag(name: str) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    try:
        return tag_to_int(raw)
    except TagError as exc:
        raise OrderbookError(f"{name}: {exc}") from exc


def _query() -> OrderQuery:
    return OrderQuery(
        category=_uint("category"),
        workerpool=_address("workerpool"),
        workerpool_owner=_address("workerpoolOwner", allow_any=False),
        app=_address("app"),
        is_app_strict=_bool("isAppStrict"),
        dataset=_address("dataset"),
        is_dataset_strict=_bool("isDatasetStrict"),
        requester=_address("requester"),
        is_requester_strict=_bool("isRequesterStrict"),
        min_tag=_tag("minTag"),
        max_tag=_tag("maxTag"),
        min_trust=_uint("minTrust"),
        min_volume=_uint("minVolume", low=1),
        page=_uint("page"),
        page_index=_uint("pageIndex"),
        page_size=_uint("pageSize", low=MIN_PAGE_SIZE, high=MAX_PAGE_SIZE),
    )
