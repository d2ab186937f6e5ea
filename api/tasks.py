"""``/api/v1/tasks``: tasks newest first (filter by status and deal), and one task with its
replicates and its timeline (each status change with its time, tx hash and note).

What a worker reported that is not for everyone stays out (``PRIVATE_REPLICATE_FIELDS``):
the output of a failed run (``logTail``) only goes to a caller with the bearer token, and a
result digest (which older workers reported before the reveal, when a lazy worker could have
contributed it without computing) to nobody."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from api.common import check_hex32, choice_arg, jsonable, paginate
from api.context import ctx
from api.errors import not_found
from api.security import has_token
from pool.states import TaskStatus
from pool.store import PRIVATE_REPLICATE_FIELDS

bp = Blueprint("tasks", __name__, url_prefix="/api/v1")


@bp.get("/tasks")
def tasks() -> Any:
    store = ctx().store
    query: dict[str, Any] = {}
    status = choice_arg("status", [str(s) for s in TaskStatus])
    if status:
        query["status"] = status
    deal = request.args.get("deal")
    if deal is not None:
        query["chainDealId"] = check_hex32(deal, "deal")
    return jsonify(
        paginate(
            lambda: store.count("tasks", query),
            lambda skip, limit: store.page("tasks", query, skip, limit, with_timeline=False),
        )
    )


@bp.get("/tasks/<taskid>")
def task(taskid: str) -> Any:
    taskid = check_hex32(taskid, "taskid")
    store = ctx().store
    doc = store.task(taskid)
    if doc is None:
        raise not_found(f"no task {taskid} for this pool")
    doc.setdefault("timeline", [])
    doc["replicates"] = store.replicates_in_order(taskid, hide=hidden_replicate_fields())
    return jsonify(jsonable(doc))


def hidden_replicate_fields() -> tuple[str, ...]:
    """The replicate fields this request may not see (the log tail: unless it presents
    the bearer token)."""
    if has_token():
        return tuple(f for f in PRIVATE_REPLICATE_FIELDS if f != "logTail")
    return PRIVATE_REPLICATE_FIELDS
