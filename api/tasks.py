"""``/api/v1/tasks``: tasks newest first (filter by status and deal), and one task with its
replicates and its timeline (each status change with its time, tx hash and note)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify, request

from api.common import check_hex32, choice_arg, jsonable, paginate
from api.context import ctx
from api.errors import not_found
from pool.states import TaskStatus

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
    doc["replicates"] = store.replicates_in_order(taskid)
    return jsonify(jsonable(doc))
