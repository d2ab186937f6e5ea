"""``/api/v1/workers``: the worker nodes known from their heartbeats.

A worker's status is derived at read time (LOST once its last heartbeat is older than
``WORKER_LOST_TIMEOUT``), so a node that died without a word shows as LOST even before the
scheduler notices. ``DELETE`` forgets a LOST node (one that left for good); it is the API's
one mutating route of its own and needs the bearer token.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.common import check_address, choice_arg, jsonable, paginate
from api.context import ApiContext, ctx
from api.errors import ApiError, not_found
from api.queries import LOST, WORKER_STATUSES, worker_views
from api.tasks import hidden_replicate_fields
from pool.clock import utcnow

bp = Blueprint("workers", __name__, url_prefix="/api/v1")

RECENT_REPLICATES = 20


@bp.get("/workers")
def workers() -> Any:
    context = ctx()
    status = choice_arg("status", WORKER_STATUSES)
    views = [v for v in worker_views(context, utcnow()) if status is None or v["status"] == status]
    return jsonify(paginate(lambda: len(views), lambda skip, limit: views[skip : skip + limit]))


@bp.get("/workers/<address>")
def worker(address: str) -> Any:
    address = check_address(address)
    context = ctx()
    store = context.store
    view = _find(context, address)
    recent = store.replicates_of_worker(
        address,
        limit=RECENT_REPLICATES,
        newest_first=True,
        with_timeline=False,
        hide=hidden_replicate_fields(),
    )
    view["replicates"] = {
        "byStatus": store.count_by_status("replicates", {"worker": address}),
        "recent": recent,
    }
    return jsonify(jsonable(view))


@bp.delete("/workers/<address>")
def forget_worker(address: str) -> Any:
    """Forget a LOST worker (its replicates stay). A live one is refused: it would come
    back with its next heartbeat anyway."""
    address = check_address(address)
    context = ctx()
    view = _find(context, address)
    if view["status"] != LOST:
        raise ApiError(409, "conflict", f"worker {address} is not LOST: it still sends heartbeats")
    # only the document we judged: a heartbeat that arrived meanwhile keeps the worker
    context.store.forget_worker(address, view.get("lastSeen"))
    return jsonify({"deleted": address})


def _find(context: ApiContext, address: str) -> dict[str, Any]:
    for view in worker_views(context, utcnow()):
        if view.get("address") == address:
            return view
    raise not_found(f"no worker {address} has sent a heartbeat")
