"""No devnet private key in any API response or any log line of a full run.

The pool runs end to end (scheduler in this process, a `workerpool worker` process), and the
API is served with the scheduler's key and a bearer token in its settings, as in the
standalone mode. Every response of every route (errors included) is kept, with the log
records of this process at DEBUG, its printed output and the worker's log file; none may
hold a private key of the devnet's accounts, in any spelling, nor its mnemonic.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import pytest
import requests
from api_support import serve
from pool_fixtures import RunningPool

from api.app import create_app
from devnet.network import PUBLIC_TEST_MNEMONIC
from devnet.requester import deal_params

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

TOKEN = "bearer-token-of-the-secrets-test"


def _private_keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        keys = {str(v) for k, v in node.items() if k == "private_key" and v}
        return keys.union(*(_private_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_private_keys(v) for v in node))
    return set()


def _paths(pool: RunningPool, taskids: list[str], dealid: str, chain_id: int) -> list[str]:
    worker = pool.worker_address(0)
    scheduler = pool.devnet.address("scheduler")
    return [
        "/",
        "/static/dashboard.js",
        "/healthz",
        "/metrics",
        "/api/v1/pool",
        "/api/v1/workers",
        f"/api/v1/workers/{worker}",
        "/api/v1/deals",
        f"/api/v1/deals/{dealid}",
        "/api/v1/tasks",
        f"/api/v1/tasks?deal={dealid}&status=COMPLETED",
        *(f"/api/v1/tasks/{t}" for t in taskids),
        "/api/v1/orders",
        "/api/v1/openapi.json",
        "/api/v1/openapi.yaml",
        f"/workerpoolorders?chainId={chain_id}",
        f"/challenge?chainId={chain_id}&address={scheduler}",
        # errors
        "/api/v1/tasks/0x12",
        "/api/v1/tasks?per_page=1000",
        f"/api/v1/tasks/0x{'ab' * 32}",
        "/nowhere",
    ]


def test_no_private_key_in_any_response_or_log_line_of_a_full_run(
    running_pool: RunningPool, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = running_pool
    devnet = pool.devnet
    keys = _private_keys(devnet.info["accounts"])
    assert len(keys) >= 5  # scheduler, requester, app provider, workers ...
    caplog.set_level(logging.DEBUG)
    # Given the API holding the scheduler's key and a token, as the standalone mode does
    settings = replace(
        pool.scheduler.settings,
        core_wallet_private_key=devnet.key("scheduler"),
        api_token=TOKEN,
    )
    bodies: list[str] = []
    crawls = 0
    with serve(create_app(settings, pool.store)) as url:
        session = requests.Session()

        def crawl(taskids: list[str], dealid: str) -> None:
            nonlocal crawls
            crawls += 1
            for path in _paths(pool, taskids, dealid, int(devnet.client.chain_id)):
                bodies.append(session.get(url + path, timeout=10).text)
            worker = f"{url}/api/v1/workers/{pool.worker_address(0)}"
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                bodies.append(session.delete(worker, headers=headers, timeout=10).text)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            bodies.append(session.delete(worker, headers=auth, timeout=10).text)  # 409
            bodies.append(session.post(url + "/workerpoolorders", json={}, timeout=10).text)

        # When a worker runs a deal to the end while everything is read
        pool.start_worker(0)
        deal = pool.match(volume=2, trust=1, params=deal_params("secrets"))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            crawl(deal.taskids(), deal.dealid)
            if all((pool.store.task(t) or {}).get("status") == "COMPLETED" for t in deal.taskids()):
                break
            time.sleep(0.5)
        pool.wait_tasks(deal.taskids(), lambda d: d.get("status") == "COMPLETED", timeout=5)
        crawl(deal.taskids(), deal.dealid)
    pool.stop_workers()

    # Then none of it holds a key (bare hex, any case) or the mnemonic
    out, err = capfd.readouterr()
    texts = {
        "responses": "\n".join(bodies),
        "log records": "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records),
        "printed output": out + err,
        **{f"log file {p.name}": p.read_text(errors="replace") for p in pool.logs},
    }
    # every route was read at least once while the deal ran and once after it ended
    assert crawls >= 2 and len(bodies) == crawls * (
        len(_paths(pool, deal.taskids(), deal.dealid, 1)) + 5
    )
    assert any("COMPLETED" in b for b in bodies)
    assert caplog.records and all(p.stat().st_size for p in pool.logs)
    needles = {key.lower().removeprefix("0x") for key in keys}
    for name, text in texts.items():
        lowered = text.lower()
        leaked = [k[:10] for k in needles if k in lowered]
        assert not leaked, f"{name} holds private key(s) starting {leaked}"
        assert PUBLIC_TEST_MNEMONIC not in lowered, f"{name} holds the devnet mnemonic"
        assert TOKEN not in text, f"{name} holds the API token"
