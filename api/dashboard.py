"""``/``: the dashboard, server-rendered, then kept live by ``static/dashboard.js``.

The first paint comes from the same queries as the JSON routes, so the page is useful
without JavaScript (and a screenshot of it is meaningful); the script then polls
``/api/v1/pool``, ``/tasks``, ``/workers`` and ``/orders`` every two seconds and redraws the
tables. No front-end build: one template, one script, one stylesheet.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, render_template

from api.common import jsonable
from api.context import ctx
from api.orders import order_store, order_view
from api.queries import pool_summary, worker_views
from pool.clock import utcnow

bp = Blueprint("dashboard", __name__)

TASK_ROWS = 50
POLL_MS = 2000


@bp.get("/")
def index() -> Any:
    context = ctx()
    data: dict[str, Any] = {"summary": None, "tasks": [], "workers": [], "orders": []}
    error = None
    try:
        data["summary"] = pool_summary(context)
        store = context.store
        data["tasks"] = jsonable(store.page("tasks", {}, 0, TASK_ROWS, with_timeline=False))
        data["workers"] = jsonable(worker_views(context, utcnow())[:200])
        data["orders"] = jsonable([order_view(doc) for doc in order_store(context).newest()])
    except Exception as exc:  # the page still loads and the script retries
        error = f"the pool's state could not be read ({type(exc).__name__}); retrying"
    return render_template(
        "dashboard.html",
        **data,
        error=error,
        poll_ms=POLL_MS,
        task_rows=TASK_ROWS,
    )
