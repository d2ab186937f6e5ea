"""``workerpool status``: the dashboard's summary in a terminal, for operators without a
browser (an SSH session, a script, a cron mail).

It reads the status API over HTTP rather than MongoDB, so it shows exactly what the
dashboard shows, needs no database credentials, and also works in the embedded mode
(``workerpool standalone``), whose in-memory store no other process can open.
"""

from __future__ import annotations

import json
import time
from typing import Any

import click
import requests

from cli.errors import Unreachable, refusals
from pool.settings import Settings


class StatusError(Exception):
    """The API did not answer, or answered something that is not its JSON."""


def default_api_url(settings: Settings) -> str:
    host = settings.api_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.core_port}"


def fetch(api: str, tasks: int, timeout: float = 5.0) -> dict[str, Any]:
    """The summary, health, latest tasks, workers and orders, as the API serves them."""
    session = requests.Session()
    out: dict[str, Any] = {}
    paths = {
        "pool": "/api/v1/pool",
        "tasks": f"/api/v1/tasks?per_page={tasks}",
        "workers": "/api/v1/workers?per_page=200",
        "orders": "/api/v1/orders?per_page=50",
        "health": "/healthz",
    }
    for key, path in paths.items():
        try:
            response = session.get(api + path, timeout=timeout)
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise StatusError(f"{api}{path}: {type(exc).__name__}: {exc}") from exc
        if key != "health" and not response.ok:
            message = body.get("error", {}).get("message") if isinstance(body, dict) else body
            raise StatusError(f"{api}{path}: HTTP {response.status_code}: {message}")
        out[key] = body
    return out


def _counts(counts: dict[str, int]) -> str:
    return " · ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _short(hexid: str | None) -> str:
    return (hexid[:14] + "…") if hexid else "-"


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)


def render(data: dict[str, Any]) -> str:
    s = data["pool"]
    health = data["health"]
    lines = [
        f"pool     {s['address'] or '(no POOL_ADDRESS)'}  owner {_dash(s['owner'])}",
        f"chain    id {_dash(s['chainId'])}, head {_dash(s['chain']['headBlock'])}, listener "
        f"at {_dash(s['listener']['block'])} (lag {_dash(s['listener']['lag'])})"
        + (f"  [{s['chain']['error']}]" if s["chain"]["error"] else ""),
        "health   "
        + (
            "ok"
            if health.get("ok")
            else "FAILING: "
            + ", ".join(
                f"{name} ({check.get('error', 'not ok')})"
                for name, check in health.get("checks", {}).items()
                if not check.get("ok")
            )
        ),
        f"workers  {s['workers']['alive']} alive, {s['workers']['lost']} lost; slots "
        f"{s['slots']['used']}/{s['slots']['total']} used",
        "queues   " + " · ".join(f"{k} {_dash(v)}" for k, v in s["queues"].items()),
        f"deals    {s['deals']['total']}: {_counts(s['deals']['byStatus'])}",
        f"tasks    {s['tasks']['total']}: {_counts(s['tasks']['byStatus'])}",
        "backlog  " + _counts({k: v for k, v in s["backlog"].items()}),
        "",
    ]
    tasks = data["tasks"]["items"]
    lines.append(f"latest tasks ({len(tasks)} of {data['tasks']['total']})")
    lines.append(f"  {'TASK':<16} {'DEAL':<16} {'#':>3}  {'STATUS':<22} UPDATED")
    for t in tasks:
        lines.append(
            f"  {_short(t['chainTaskId']):<16} {_short(t['chainDealId']):<16} "
            f"{t['index']:>3}  {t['status']:<22} {t.get('updatedAt', '')}"
        )
    lines.append("")
    workers = data["workers"]["items"]
    lines.append(f"workers ({data['workers']['total']})")
    lines.append(f"  {'ADDRESS':<42} {'NAME':<18} {'STATUS':<7} {'HEARTBEAT':>10}  SLOTS")
    for w in workers:
        age = w.get("heartbeatAge")
        age_text = "-" if age is None else f"{age:.1f}s ago"
        lines.append(
            f"  {w['address']:<42} {str(w.get('name', ''))[:18]:<18} {w['status']:<7} "
            f"{age_text:>10}  {w.get('busySlots', 0)}/{w.get('slots', 0)}"
        )
    lines.append("")
    orders = data["orders"]["items"]
    lines.append(f"orders ({data['orders']['total']})")
    lines.append(f"  {'ORDER':<16} {'STATUS':<12} {'REMAINING':>9} {'PRICE':>12} CATEGORY")
    for o in orders:
        remaining = f"{_dash(o['remaining'])}/{_dash(o['volume'])}"
        lines.append(
            f"  {_short(o['orderHash']):<16} {o['status']!s:<12} {remaining:>9} "
            f"{_dash(o['price']):>12} {_dash(o['category'])}"
        )
    return "\n".join(lines)


@click.command("status")
@click.option(
    "--api",
    "api_url",
    default=None,
    help="Base URL of the status API (default: WORKERPOOL_API_HOST:IEXEC_CORE_PORT).",
)
@click.option(
    "--tasks",
    "task_count",
    default=10,
    show_default=True,
    type=click.IntRange(1, 200),
    help="How many of the latest tasks to list.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON the API answered.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.5),
    default=None,
    help="Redraw every N seconds until interrupted.",
)
def command(api_url: str | None, task_count: int, as_json: bool, watch: float | None) -> None:
    """Show the pool's summary, latest tasks, workers and orders (from the status API)."""
    if api_url is None:
        with refusals():
            api_url = default_api_url(Settings.from_env())
    api_url = api_url.rstrip("/")
    while True:
        try:
            data = fetch(api_url, task_count)
        except StatusError as exc:
            message = (
                f"the status API does not answer: {exc}\n"
                "(start it with `workerpool api`, or `workerpool standalone`)"
            )
            if watch is None:
                raise Unreachable(message) from exc
            click.echo(f"error: {message}", err=True)
        else:
            text = json.dumps(data, indent=2) if as_json else render(data)
            if watch is not None:
                click.clear()
            click.echo(text)
        if watch is None:
            return
        time.sleep(watch)
