"""``/healthz``: can this API, and the pool behind it, do their job right now?

200 when MongoDB and Redis answer, the chain node answers (and is the chain IEXEC_CHAIN_ID
names) and the listener is at most ``WORKERPOOL_API_MAX_LAG`` blocks behind the head it may
read; 503 otherwise, with each check's result, so a load balancer or ``docker compose``
health check can act on the code and a person can read why. Error texts name the failing
part, never its URL (which may hold credentials).

Beside the checks, ``funds`` shows the workerpool owner's (the scheduler wallet's) stake, the
stake its published orders need and its gas, and ``warnings`` says in words what falls short:
the pool still runs the deals it has, so these do not make the answer a 503.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.context import ApiContext, ctx
from api.queries import listener_position
from orders.book import stake_coverage
from orders.store import OrderStore

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
    expected = context.settings.chain_id
    if facts.chain_id is not None and expected and facts.chain_id != expected:
        checks["chain"]["ok"] = False
        checks["chain"]["error"] = (
            f"the node reports chain {facts.chain_id}, the settings name chain {expected}"
        )
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
    funds, warnings = _funds(context, facts.owner, checks["mongo"]["ok"])
    body: dict[str, Any] = {"ok": healthy, "checks": checks, "warnings": warnings}
    if funds is not None:
        body["funds"] = funds
    response = jsonify(body)
    response.status_code = 200 if healthy else 503
    return response


def _funds(
    context: ApiContext, owner: str | None, store_ok: bool
) -> tuple[dict[str, Any] | None, list[str]]:
    """The owner's stake against its published orders, and its gas; with the warnings."""
    if owner is None:
        return None, []
    try:
        funds = context.chain.owner_funds(owner)
    except Exception as exc:  # the chain check above says why
        return None, [f"the workerpool owner's funds could not be read: {type(exc).__name__}"]
    warnings = []
    view: dict[str, Any] = {
        "owner": owner,
        "stake": funds.stake,
        "locked": funds.locked,
        "gas": {"wei": funds.gas.wei, "transactions": funds.gas.transactions},
    }
    if funds.gas.low:
        warnings.append(f"scheduler wallet: {funds.gas.describe(owner)}")
    if store_ok:
        coverage = stake_coverage(OrderStore(context.store.db), owner, funds.stake)
        view["ordersNeed"] = coverage.needed
        if not coverage.covered:
            warnings.append(coverage.warning())
    return view, warnings
