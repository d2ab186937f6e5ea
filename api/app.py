"""The Flask status API (read-only), built by a factory from settings and a store.

This first cut serves what the demo and operators need to follow deals: pool summary,
deals, tasks with their timeline, and the files of the local result publisher.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flask import Flask, abort, jsonify, send_from_directory

from pool.settings import Settings
from pool.states import TaskStatus
from pool.store import Store

HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")


def create_app(settings: Settings, store: Store, results_dir: Path | None = None) -> Flask:
    app = Flask("workerpool-api")
    app.config["JSON_SORT_KEYS"] = False

    def _doc(doc: dict[str, Any] | None) -> Any:
        if doc is None:
            abort(404)
        return jsonify(_jsonable(doc))

    @app.get("/healthz")
    def healthz() -> Any:
        store.db.command("ping")
        return jsonify({"ok": True})

    @app.get("/api/v1/pool")
    def pool() -> Any:
        by_status = {
            s: store.tasks.count_documents({"status": s}) for s in (str(x) for x in TaskStatus)
        }
        return jsonify(
            {
                "address": settings.pool_address,
                "chainRpc": settings.chain_rpc_url,
                "deals": store.deals.count_documents({}),
                "tasksByStatus": {k: v for k, v in by_status.items() if v},
                "workers": store.workers.count_documents({}),
            }
        )

    @app.get("/api/v1/deals/<dealid>")
    def deal(dealid: str) -> Any:
        if not HEX32.match(dealid):
            abort(400)
        doc = store.deal(dealid)
        if doc is not None:
            doc["tasks"] = [
                t["chainTaskId"] for t in store.tasks_in(TaskStatus, chainDealId=dealid)
            ]
        return _doc(doc)

    @app.get("/api/v1/tasks/<taskid>")
    def task(taskid: str) -> Any:
        if not HEX32.match(taskid):
            abort(400)
        doc = store.task(taskid)
        if doc is not None:
            doc["replicates"] = store.replicates_of(taskid)
        return _doc(doc)

    @app.get("/results/<name>")
    def result_file(name: str) -> Any:
        if results_dir is None or not re.match(r"^0x[0-9a-f]{64}\.zip$", name):
            abort(404)
        return send_from_directory(results_dir, name, mimetype="application/zip")

    return app


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if k != "_id"}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat() + "Z"
    return value
