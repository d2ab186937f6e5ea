"""The status API on the store of a real devnet run: every endpoint, the 400 and 404 cases,
pagination, /healthz, /metrics, the dashboard's first paint, and a property-based run of
schemathesis against the served OpenAPI document.

One pool runs for the whole module (redis-server, dockerd, IPFS, anvil + PoCo, a
``workerpool worker`` process): a deal of 3 echo tasks completes, a task the pool refuses
(it asks for an encrypted result) fails at its start and waits, and an order is published
through the market-shaped orderbook. The API under test is served by waitress over real
HTTP, from the scheduler's own store.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import requests
import schemathesis
from api_support import module_pool, serve, wait_for
from devnet_fixtures import DevnetHandle
from flask import Flask
from hypothesis import HealthCheck, settings
from pool_fixtures import RunningPool
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.docs import openapi_document
from devnet.requester import MatchedDeal, deal_params
from orders.client import OrderbookClient
from orders.rules import template_from_settings
from poco.orders import random_salt
from pool.messages import REPLICATE_QUEUES, SCHEDULER_QUEUE

pytestmark = [pytest.mark.devnet, pytest.mark.docker, pytest.mark.redis]

ORDER_VOLUME = 5
ORDER_PRICE = 0
UNKNOWN = "0x" + "ab" * 32
TOKEN = "test-token-for-the-mutating-routes"


@dataclass
class DevnetRun:
    pool: RunningPool
    app: Flask
    token_app: Flask  # the same API with WORKERPOOL_API_TOKEN set
    url: str
    completed: MatchedDeal
    crashed: MatchedDeal
    order_hash: str
    worker: str

    @property
    def devnet(self) -> DevnetHandle:
        return self.pool.devnet

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.url + path, params=params, timeout=10)

    def json(self, path: str, expect: int = 200, **params: Any) -> Any:
        response = self.get(path, **params)
        assert response.status_code == expect, (path, response.status_code, response.text)
        assert response.headers["Content-Type"].startswith("application/json")
        return response.json()


def _iso(text: str) -> dt.datetime:
    assert text.endswith("Z"), text
    return dt.datetime.fromisoformat(text.removesuffix("Z"))


@pytest.fixture(scope="module")
def run(
    devnet: DevnetHandle,
    redis_url: str,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DevnetRun]:
    tmp = tmp_path_factory.mktemp("api-run")
    with module_pool(devnet, redis_url, ipfs_api_url, tmp) as pool:
        pool.start_worker(0)
        app = create_app(pool.scheduler.settings, pool.store)
        with serve(app) as url:
            # Given an order published through the pool's own orderbook (market-shaped API)
            order = replace(
                template_from_settings(pool.scheduler.settings),
                volume=ORDER_VOLUME,
                workerpoolprice=ORDER_PRICE,
                salt=random_salt(),
            ).signed(devnet.key("scheduler"), devnet.client.domain())
            published = OrderbookClient(url, int(devnet.client.chain_id)).publish(
                order.to_dict(), devnet.key("scheduler")
            )
            # And a deal of 3 tasks that completes, and one the pool refuses (a failing app
            # would complete with an error result): it waits until its final deadline
            completed = pool.match(volume=3, trust=1, params=deal_params("hello api"))
            crashed = pool.match(app="crash", params=deal_params("x", iexec_result_encryption=True))
            pool.wait_tasks(
                completed.taskids(), lambda d: d.get("status") == "COMPLETED", timeout=120
            )
            (crash_task,) = crashed.taskids()
            wait_for(
                lambda: any(
                    r["status"] == "START_FAILED" for r in pool.store.replicates_of(crash_task)
                ),
                60,
                "the refused task's replicate to fail",
            )
            token_app = create_app(replace(pool.scheduler.settings, api_token=TOKEN), pool.store)
            yield DevnetRun(
                pool,
                app,
                token_app,
                url,
                completed,
                crashed,
                published["orderHash"],
                pool.worker_address(0),
            )


# ---- /api/v1/pool -------------------------------------------------------------------------


def test_pool_summary_reports_identity_chain_workers_queues_and_counts(run: DevnetRun) -> None:
    body = run.json("/api/v1/pool")
    assert body["address"].lower() == run.devnet.info["workerpool"].lower()
    assert body["owner"].lower() == run.devnet.address("scheduler").lower()
    assert body["chainId"] == run.devnet.client.chain_id
    assert body["chain"]["reachable"] is True and body["chain"]["error"] is None
    assert abs(body["chain"]["headBlock"] - run.devnet.client.block_number()) <= 2
    # the lag is head - listener cursor; a tick (0.3 s here) may trail a few blocks under load
    listener = body["listener"]
    assert listener["block"] is not None
    assert 0 <= listener["lag"] <= 10
    assert body["workers"] == {"alive": 1, "lost": 0, "other": 0, "total": 1}
    assert body["slots"]["total"] == 2 and body["slots"]["used"] + body["slots"]["free"] == 2
    assert set(body["queues"]) == {SCHEDULER_QUEUE, *REPLICATE_QUEUES.values()}
    assert all(isinstance(n, int) for n in body["queues"].values())
    assert body["deals"] == {"total": 2, "byStatus": {"ACCEPTED": 2}}
    assert body["tasks"]["total"] == 4
    assert body["tasks"]["byStatus"]["COMPLETED"] == 3
    # the refused task waits for contributions until its final deadline
    assert body["backlog"]["compute"] == 1 and body["backlog"]["initialize"] == 0
    _iso(body["generatedAt"])


# ---- /api/v1/workers ----------------------------------------------------------------------


def test_workers_list_and_one_worker_with_its_replicates(run: DevnetRun) -> None:
    page = run.json("/api/v1/workers")
    assert page["total"] == 1 and page["pages"] == 1
    (worker,) = page["items"]
    assert worker["address"] == run.worker and worker["name"] == "test-worker-0"
    assert worker["status"] == "ALIVE" and 0 <= worker["heartbeatAge"] < 5
    assert worker["slots"] == 2 and worker["capabilities"] == ["standard"]
    assert run.json("/api/v1/workers", status="ALIVE")["total"] == 1
    assert run.json("/api/v1/workers", status="LOST")["items"] == []

    detail = run.json(f"/api/v1/workers/{run.worker.upper().replace('0X', '0x')}")
    assert detail["address"] == run.worker
    assert detail["replicates"]["byStatus"]["COMPLETED"] == 3
    assert detail["replicates"]["byStatus"]["START_FAILED"] == 1
    recent = detail["replicates"]["recent"]
    assert {r["chainTaskId"] for r in recent} == {*run.completed.taskids(), *run.crashed.taskids()}
    created = [_iso(r["createdAt"]) for r in recent]
    assert created == sorted(created, reverse=True)  # newest first
    assert "timeline" not in recent[0]


def test_worker_404_and_400(run: DevnetRun) -> None:
    missing = run.json("/api/v1/workers/0x" + "12" * 20, expect=404)
    assert missing["error"]["code"] == "not_found"
    bad = run.json("/api/v1/workers/0x1234", expect=400)
    assert bad["error"] == {
        "status": 400,
        "code": "bad_request",
        "message": "address must be 0x followed by 40 hex digits",
    }
    assert (
        "status must be one of" in run.json("/api/v1/workers", 400, status="x")["error"]["message"]
    )


# ---- /api/v1/deals ------------------------------------------------------------------------


def test_deals_list_newest_first_and_one_deal_with_its_tasks(run: DevnetRun) -> None:
    page = run.json("/api/v1/deals")
    assert page["total"] == 2
    ids = [d["chainDealId"] for d in page["items"]]
    assert ids == [run.crashed.dealid, run.completed.dealid]
    assert page["items"][1]["tasksByStatus"] == {"COMPLETED": 3}
    assert page["items"][1]["botSize"] == 3 and page["items"][1]["status"] == "ACCEPTED"
    assert run.json("/api/v1/deals", status="SKIPPED")["total"] == 0

    deal = run.json(f"/api/v1/deals/{run.completed.dealid}")
    assert deal["chainDealId"] == run.completed.dealid
    assert [t["chainTaskId"] for t in deal["tasks"]] == run.completed.taskids()
    assert [t["index"] for t in deal["tasks"]] == [0, 1, 2]
    assert deal["tasksByStatus"] == {"COMPLETED": 3}
    assert deal["txHash"].startswith("0x") and deal["blockNumber"] > 0


def test_deal_404_and_400(run: DevnetRun) -> None:
    assert run.json(f"/api/v1/deals/{UNKNOWN}", expect=404)["error"]["code"] == "not_found"
    assert run.json("/api/v1/deals/0xnope", expect=400)["error"]["code"] == "bad_request"
    assert run.json("/api/v1/deals", 400, status="OPEN")["error"]["code"] == "bad_request"


# ---- /api/v1/tasks ------------------------------------------------------------------------


def test_tasks_filtered_by_status_and_deal(run: DevnetRun) -> None:
    assert run.json("/api/v1/tasks")["total"] == 4
    by_deal = run.json("/api/v1/tasks", deal=run.completed.dealid)
    assert sorted(t["chainTaskId"] for t in by_deal["items"]) == sorted(run.completed.taskids())
    completed = run.json("/api/v1/tasks", status="COMPLETED")
    assert completed["total"] == 3 and all(t["status"] == "COMPLETED" for t in completed["items"])
    assert "timeline" not in completed["items"][0]
    both = run.json("/api/v1/tasks", status="COMPLETED", deal=run.crashed.dealid)
    assert both["total"] == 0 and both["items"] == []


def test_task_with_replicates_and_timeline_of_real_transactions(run: DevnetRun) -> None:
    taskid = run.completed.taskids()[0]
    task = run.json(f"/api/v1/tasks/{taskid}")
    assert task["chainTaskId"] == taskid and task["status"] == "COMPLETED"
    assert task["resultLink"].startswith('{ "storage": "ipfs"')
    statuses = [e["status"] for e in task["timeline"]]
    # trust 1: the worker's contributeAndFinalize is the FINALIZED transaction
    assert statuses[0] == "RECEIVED" and statuses[-3:] == ["RUNNING", "FINALIZED", "COMPLETED"]
    times = [_iso(e["at"]) for e in task["timeline"]]
    assert times == sorted(times)
    w3 = run.devnet.client.w3
    (entry,) = [e for e in task["timeline"] if e["status"] == "INITIALIZED"]
    receipt = w3.eth.get_transaction_receipt(entry["txHash"])
    assert receipt["status"] == 1 and receipt["to"] == run.devnet.info["hub"]
    (finalized,) = [e for e in task["timeline"] if e["status"] == "FINALIZED"]
    assert finalized["note"] == f"contributeAndFinalize by {run.worker}"
    (replicate,) = task["replicates"]
    assert replicate["worker"] == run.worker and replicate["status"] == "COMPLETED"
    assert replicate["duration"] > 0
    (entry,) = [e for e in replicate["timeline"] if e["status"] == "COMPLETED"]
    receipt = w3.eth.get_transaction_receipt(entry["txHash"])
    assert receipt["status"] == 1 and receipt["from"].lower() == run.worker

    crashed = run.json(f"/api/v1/tasks/{run.crashed.taskids()[0]}")
    (failed,) = crashed["replicates"]
    assert failed["status"] == "START_FAILED" and "iexec_result_encryption" in failed["reason"]


def test_task_404_and_400(run: DevnetRun) -> None:
    assert run.json(f"/api/v1/tasks/{UNKNOWN}", expect=404)["error"]["code"] == "not_found"
    for path, params, word in [
        ("/api/v1/tasks/0x12", {}, "taskid"),
        ("/api/v1/tasks", {"status": "DONE"}, "status"),
        ("/api/v1/tasks", {"deal": "0x12"}, "deal"),
        ("/api/v1/tasks", {"page": "0"}, "page"),
        ("/api/v1/tasks", {"page": "two"}, "page"),
        ("/api/v1/tasks", {"per_page": "201"}, "per_page"),
        ("/api/v1/tasks", {"per_page": "-1"}, "per_page"),
    ]:
        error = run.json(path, 400, **params)["error"]
        assert error["status"] == 400 and error["code"] == "bad_request"
        assert error["message"].startswith(word), error


def test_pagination_walks_every_task_once(run: DevnetRun) -> None:
    everything = [t["chainTaskId"] for t in run.json("/api/v1/tasks")["items"]]
    assert everything[0] == run.crashed.taskids()[0]  # newest first
    seen: list[str] = []
    for page in (1, 2):
        body = run.json("/api/v1/tasks", page=page, per_page=3)
        assert (body["page"], body["perPage"], body["total"], body["pages"]) == (page, 3, 4, 2)
        seen += [t["chainTaskId"] for t in body["items"]]
    assert seen == everything
    past = run.json("/api/v1/tasks", page=3, per_page=3)
    assert past["items"] == [] and past["total"] == 4
    one = run.json("/api/v1/deals", per_page=1, page=2)
    assert [d["chainDealId"] for d in one["items"]] == [run.completed.dealid]


# ---- /api/v1/orders -----------------------------------------------------------------------


def test_orders_show_the_published_order_and_its_remaining_volume(run: DevnetRun) -> None:
    page = run.json("/api/v1/orders")
    assert page["total"] == 1
    (order,) = page["items"]
    assert order["orderHash"] == run.order_hash and order["status"] == "open"
    assert order["volume"] == ORDER_VOLUME and order["remaining"] == ORDER_VOLUME
    assert order["price"] == ORDER_PRICE and order["category"] == 0
    assert order["signer"].lower() == run.devnet.address("scheduler").lower()
    assert run.json("/api/v1/orders", status="filled")["items"] == []
    assert run.json("/api/v1/orders", 400, status="OPEN")["error"]["code"] == "bad_request"


# ---- /healthz, /metrics, the dashboard, errors ------------------------------------------------


def test_healthz_is_200_with_every_check_passing(run: DevnetRun) -> None:
    body = run.json("/healthz")
    assert body["ok"] is True
    assert set(body["checks"]) == {"mongo", "redis", "chain", "listener"}
    assert all(check["ok"] for check in body["checks"].values())
    assert body["checks"]["listener"]["lag"] <= body["checks"]["listener"]["maxLag"]


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_read_the_run_from_the_store_redis_and_the_chain(run: DevnetRun) -> None:
    response = run.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    m = _samples(response.text)
    assert m[("workerpool_tasks", (("status", "COMPLETED"),))] == 3
    assert m[("workerpool_deals", (("status", "ACCEPTED"),))] == 2
    assert m[("workerpool_backlog_tasks", (("stage", "compute"),))] == 1
    assert m[("workerpool_replicates", (("status", "START_FAILED"),))] == 1
    sent = {
        k: m[("workerpool_transactions_sent", (("kind", k),))]
        for k in (
            "initialize",
            "contribute",
            "reveal",
            "finalize",
            "contributeAndFinalize",
            "claim",
        )
    }
    # initializeArray batches the tasks a tick finds (one or both deals): count distinct hashes
    initialized = {
        e["txHash"]
        for t in run.pool.store.tasks.find()
        for e in t["timeline"]
        if e["status"] == "INITIALIZED" and e.get("txHash")
    }
    assert 1 <= len(initialized) <= 2
    # each completed (trust-1) task: one contributeAndFinalize by the worker
    assert sent == {
        "initialize": len(initialized),
        "contribute": 0,
        "reveal": 0,
        "finalize": 0,
        "contributeAndFinalize": 3,
        "claim": 0,
    }
    assert all(
        m[("workerpool_transactions_failed", (("kind", k),))] == 0
        for k in ("initialize", "contribute", "reveal", "finalize")
    )
    assert m[("workerpool_replicate_duration_seconds_count", ())] == 3
    assert m[("workerpool_replicate_duration_seconds_sum", ())] > 0
    assert m[("workerpool_replicate_duration_seconds_bucket", (("le", "+Inf"),))] == 3
    assert m[("workerpool_workers", (("status", "ALIVE"),))] == 1
    age = [
        v
        for (name, labels), v in m.items()
        if name == "workerpool_worker_heartbeat_age_seconds" and ("worker", run.worker) in labels
    ]
    assert len(age) == 1 and 0 <= age[0] < 5
    assert (
        m[
            (
                "workerpool_order_remaining_volume",
                (("category", "0"), ("order", run.order_hash), ("status", "open")),
            )
        ]
        == ORDER_VOLUME
    )
    assert m[("workerpool_chain_reachable", ())] == 1
    # the lag is a snapshot: blocks mined since the last tick; the listener catches up
    lag = m[("workerpool_listener_lag_blocks", ())]
    deadline = time.monotonic() + 10
    while lag > 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        lag = _samples(run.get("/metrics").text)[("workerpool_listener_lag_blocks", ())]
    assert 0 <= lag <= 2
    assert m[("workerpool_chain_head_block", ())] > 0
    assert ("workerpool_queue_depth", (("queue", "replicates.standard"),)) in m
    for component in ("mongo", "redis", "chain"):
        assert m[("workerpool_up", (("component", component),))] == 1


def test_dashboard_first_paint_lists_tasks_workers_and_orders(run: DevnetRun) -> None:
    response = run.get("/")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    html = response.text
    for taskid in run.completed.taskids():
        assert f'data-taskid="{taskid}"' in html
    assert f'data-address="{run.worker}"' in html and f'data-orderhash="{run.order_hash}"' in html
    assert "status-COMPLETED" in html
    for asset in ("/static/dashboard.js", "/static/dashboard.css"):
        assert asset in html and run.get(asset).status_code == 200


def test_unknown_route_and_method_answer_the_error_body(run: DevnetRun) -> None:
    assert run.json("/api/v1/nope", expect=404)["error"]["code"] == "not_found"
    response = requests.post(run.url + "/api/v1/tasks", timeout=10)
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


# ---- schemathesis against the served document ------------------------------------------------


class _ForwardingApp:
    """A WSGI app that serves the module's running API (set by the test), so that the
    schema can be loaded at import time, when schemathesis parametrizes the test."""

    target: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.target(environ, start_response)


_forward = _ForwardingApp()
schema = schemathesis.openapi.from_dict(openapi_document())
schema.app = _forward


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_openapi_document_holds_for_every_operation(case: Any, run: DevnetRun) -> None:
    """No 500, no response outside the document (status, content type, schema, headers).

    The app has a bearer token, so schemathesis also checks that the mutating route refuses
    a request without it (401); the read-only mode's 403 is tested in test_api_unit.py."""
    _forward.target = run.token_app
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
