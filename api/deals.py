"""``/api/v1/deals``: deals the listener stored, newest first, with their tasks' statuses."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.common import check_hex32, choice_arg, jsonable, paginate
from api.context import ctx
from api.errors import not_found
from pool.states import DealStatus

bp = Blueprint("deals", __name__, url_prefix="/api/v1")


@bp.get("/deals")
def deals() -> Any:
    store = ctx().store
    status = choice_arg("status", [str(s) for s in DealStatus])
    query = {"status": status} if status else {}

    def fetch(skip: int, limit: int) -> list[dict[str, Any]]:
        docs = store.page("deals", query, skip, limit)
        counts = store.task_counts_by_deal([d["chainDealId"] for d in docs])
        for doc in docs:
            doc["tasksByStatus"] = counts.get(doc["chainDealId"], {})
        return docs

    return jsonify(paginate(lambda: store.count("deals", query), fetch))


@bp.get("/deals/<dealid>")
def deal(dealid: str) -> Any:
    dealid = check_hex32(dealid, "dealid")
    store = ctx().store
    doc = store.deal(dealid)
    if doc is None:
        raise not_found(f"no deal {dealid} for this pool")
    doc["tasks"] = store.tasks_of_deal(dealid)
    doc["tasksByStatus"] = store.count_by_status("tasks", {"chainDealId": dealid})
    return jsonify(jsonable(doc))
