"""``/api/v1/deals``: deals the listener stored, newest first, with their tasks' statuses."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.common import check_hex32, choice_arg, jsonable, paginate
from api.context import ctx
from api.errors import not_found
from api.queries import count_by_status
from pool.states import DealStatus

bp = Blueprint("deals", __name__, url_prefix="/api/v1")


@bp.get("/deals")
def deals() -> Any:
    store = ctx().store
    status = choice_arg("status", [str(s) for s in DealStatus])
    query = {"status": status} if status else {}

    def fetch(skip: int, limit: int) -> list[dict[str, Any]]:
        docs = list(store.deals.find(query, {"_id": 0}).sort("_id", -1).skip(skip).limit(limit))
        counts = _task_counts(store, [d["chainDealId"] for d in docs])
        for doc in docs:
            doc["tasksByStatus"] = counts.get(doc["chainDealId"], {})
        return docs

    return jsonify(paginate(lambda: store.deals.count_documents(query), fetch))


@bp.get("/deals/<dealid>")
def deal(dealid: str) -> Any:
    dealid = check_hex32(dealid, "dealid")
    store = ctx().store
    doc = store.deal(dealid)
    if doc is None:
        raise not_found(f"no deal {dealid} for this pool")
    tasks = list(
        store.tasks.find(
            {"chainDealId": dealid},
            {"_id": 0, "chainTaskId": 1, "index": 1, "status": 1, "updatedAt": 1},
        ).sort("index", 1)
    )
    doc["tasks"] = tasks
    doc["tasksByStatus"] = count_by_status(store.tasks, {"chainDealId": dealid})
    return jsonify(jsonable(doc))


def _task_counts(store: Any, dealids: list[str]) -> dict[str, dict[str, int]]:
    if not dealids:
        return {}
    rows = store.tasks.aggregate(
        [
            {"$match": {"chainDealId": {"$in": dealids}}},
            {"$group": {"_id": {"deal": "$chainDealId", "status": "$status"}, "n": {"$sum": 1}}},
        ]
    )
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["_id"]["deal"], {})[row["_id"]["status"]] = int(row["n"])
    return counts
