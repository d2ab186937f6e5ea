"""``/healthz``: can this API, and the pool behind it, do their job right now?

200 when MongoDB and Redis answer, the chain node answers and the listener is at most
``WORKERPOOL_API_MAX_LAG`` blocks behind the head it may read; 503 otherwise, with each
check's result, so a load balancer or ``docker compose`` health check can act on the code
and a person can read why. Error texts name the failing part, never its URL (which may hold
credentials).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.context import ctx
from api.queries import listener_position

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> Any:
    context = ctx()
    checks: dict[str, dict[str, Any]] = {}
    try:
        context.store.db.command("ping")
        checks["mongo"] = {"ok": True}
    except Exception as exc:
        checks["mongo"] = {"ok": False, "error": f"MongoDB does not answer: {type(exc).__name__}"}
    try:
        context.redis.ping()
        checks["redis"] = {"ok": True}
    except Exception as exc:
        checks["redis"] = {"ok": False, "error": f"Redis does not answer: {type(exc).__name__}"}
    facts = context.chain.facts()
    checks["chain"] = {"ok": facts.reachable, "headBlock": facts.head}
    if facts.error:
        checks["chain"]["error"] = facts.error
    bound = context.settings.api_max_lag
    if checks["mongo"]["ok"] and facts.head is not None:
        position = listener_position(context, facts.head, facts.chain_id)
        ok = position["lag"] is not None and position["lag"] <= bound
        checks["listener"] = {"ok": ok, "lag": position["lag"], "maxLag": bound}
        if not ok:
            checks["listener"]["error"] = f"listener is {position['lag']} blocks behind"
    else:
        checks["listener"] = {
            "ok": False,
            "lag": None,
            "maxLag": bound,
            "error": "needs MongoDB and the chain",
        }
    healthy = all(check["ok"] for check in checks.values())
    response = jsonify({"ok": healthy, "checks": checks})
    response.status_code = 200 if healthy else 503
    return response
