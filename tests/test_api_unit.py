"""The API's rules on a store built by hand (no chain, no worker): the document matches the
routes, nothing connects at creation, read-only unless a bearer token is set, secrets are
masked, derived worker statuses, /healthz's lag bound, one metrics registry per app, and
the `workerpool status` and `workerpool api` commands over real HTTP."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fakeredis
import mongomock_ng as mongomock
import pytest
import requests
from api_support import serve
from click.testing import CliRunner
from devnet_fixtures import free_port
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from api.context import ChainProbe
from api.docs import openapi_document
from api.queries import worker_view
from api.security import SecretFilter, secret_values
from cli.main import main
from pool.clock import utcnow
from pool.settings import Settings
from pool.states import TaskStatus
from pool.store import Store

ROOT = Path(__file__).resolve().parents[1]
POOL = "0x" + "ab" * 20
OWNER = "0x" + "cd" * 20
HUB = "0x" + "ef" * 20
KEY = "0x" + "4c" * 32
TOKEN = "s3cret-bearer-token"
ALIVE_WORKER = "0x" + "a1" * 20
LOST_WORKER = "0x" + "b2" * 20


class FakeChainClient:
    """The three reads the API makes of the chain."""

    def __init__(self, head: int = 100, chain_id: int = 65535) -> None:
        self.head = head
        self.chain_id = chain_id

    def block_number(self) -> int:
        return self.head

    def workerpool_owner(self, pool: str) -> str:
        return OWNER


def _settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {
        "pool_address": POOL,
        "chain_rpc_url": "http://127.0.0.1:1",
        "hub_address": HUB,
        "start_block": 90,
    }
    return Settings(**{**base, **kw})


def _task(i: int, deal: str, status: str = "RECEIVED") -> dict[str, Any]:
    return {
        "chainTaskId": "0x" + f"{i:064x}",
        "chainDealId": deal,
        "index": i,
        "status": status,
        "trust": 1,
        "replicatesNeeded": 1,
        "replicatesGranted": 0,
    }


@pytest.fixture
def store() -> Store:
    """A store with one deal of 120 tasks, an alive and a lost worker, and a cursor."""
    store = Store(mongomock.MongoClient()["unit"])
    store.ensure_indexes()
    deal = "0x" + "d0" * 32
    store.save_deal(
        {"chainDealId": deal, "status": "ACCEPTED", "botSize": 120},
        [_task(i, deal) for i in range(120)],
    )
    store.transition_task(_task(0, deal)["chainTaskId"], TaskStatus.INITIALIZING)
    now = utcnow()
    store.workers.insert_many(
        [
            {
                "address": ALIVE_WORKER,
                "name": "a",
                "slots": 4,
                "busySlots": 1,
                "lastSeen": now,
                "status": "ALIVE",
                "capabilities": ["standard"],
            },
            {
                "address": LOST_WORKER,
                "name": "b",
                "slots": 2,
                "busySlots": 0,
                "lastSeen": now - dt.timedelta(minutes=5),
                "status": "ALIVE",
            },
        ]
    )
    store.advance_cursor(f"SchedulerNotice:{POOL.lower()}", 98)
    return store


def _app(store: Store, head: int = 100, **kw: Any) -> Any:
    settings = _settings(**kw)
    return create_app(
        settings,
        store,
        redis=fakeredis.FakeRedis(),
        chain=ChainProbe(settings, FakeChainClient(head)),
    )


# ---- the document and the routes --------------------------------------------------------------


def test_openapi_document_lists_exactly_the_routes_of_the_app(store: Store) -> None:
    app = _app(store)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith(("orderbook.", "core.")):
            # static assets; the market-shaped orderbook (docs/orders.md); iexec-core's task
            # routes and the Compass route (docs/api.md, "For requesters")
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((method, path))
    documented = {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert routes == documented


def test_create_app_connects_to_nothing_and_healthz_says_what_is_down() -> None:
    settings = Settings(
        pool_address=POOL,
        chain_rpc_url=f"http://127.0.0.1:{free_port()}",
        hub_address=HUB,
        mongo_url=f"mongodb://127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    started = time.monotonic()
    app = create_app(settings)  # nothing answers at those addresses: must not matter here
    assert time.monotonic() - started < 1
    client = app.test_client()
    health = client.get("/healthz")
    assert health.status_code == 503
    checks = health.get_json()["checks"]
    assert {name: c["ok"] for name, c in checks.items()} == {
        "mongo": False,
        "redis": False,
        "chain": False,
        "listener": False,
    }
    assert checks["mongo"]["error"].startswith("MongoDB does not answer")
    assert "127.0.0.1" not in json.dumps(checks)  # names the part, never its URL
    down = client.get("/api/v1/pool")
    assert down.status_code == 503
    assert down.get_json()["error"]["code"] == "store_unavailable"


# ---- read-only, bearer token ---------------------------------------------------------------------


def test_mutating_routes_are_refused_without_a_configured_token(store: Store) -> None:
    client = _app(store).test_client()
    response = client.delete(f"/api/v1/workers/{LOST_WORKER}")
    assert response.status_code == 403
    assert response.get_json()["error"]["code"] == "read_only"
    assert store.workers.count_documents({}) == 2


def test_bearer_token_guards_the_mutating_route(store: Store) -> None:
    client = _app(store, api_token=TOKEN).test_client()
    path = f"/api/v1/workers/{LOST_WORKER}"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.delete(path, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.get_json()["error"]["code"] == "unauthorized"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    alive = client.delete(f"/api/v1/workers/{ALIVE_WORKER}", headers=auth)
    assert alive.status_code == 409 and alive.get_json()["error"]["code"] == "conflict"
    assert client.delete(path, headers=auth).get_json() == {"deleted": LOST_WORKER}
    assert client.delete(path, headers=auth).status_code == 404
    assert [w["address"] for w in store.workers.find()] == [ALIVE_WORKER]


def test_the_orderbook_authenticates_its_own_mutating_routes(store: Store) -> None:
    """publish/unpublish carry the iExec market's signed challenge, not our bearer token:
    the app-wide guard lets them reach the orderbook, which answers in the market's shape."""
    settings = Settings(pool_address=POOL)  # no chain: the orderbook refuses by itself
    client = create_app(settings, store, redis=fakeredis.FakeRedis()).test_client()
    response = client.post("/workerpoolorders?chainId=1", json={"order": {}})
    body = response.get_json()
    assert body["ok"] is False and "error" in body and response.status_code != 403


# ---- secrets --------------------------------------------------------------------------------


def test_secrets_are_masked_in_bodies_and_log_records(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    password_file = tmp_path / "password"
    password_file.write_text("keystore-password-123\n")
    settings_kw: dict[str, Any] = {
        "core_wallet_private_key": KEY,
        "api_token": TOKEN,
        "worker_mnemonic": "test test test test test test test test test test test junk",
        "core_wallet_password_file": str(password_file),
    }
    # a document that (wrongly) holds secrets, in each spelling
    taskid = _task(5, "")["chainTaskId"]
    store.set_task_fields(
        taskid,
        {
            "failureReason": f"{KEY} {KEY[2:].upper()} {TOKEN} keystore-password-123 "
            "test test test test test test test test test test test junk"
        },
    )
    client = _app(store, **settings_kw).test_client()
    body = client.get(f"/api/v1/tasks/{taskid}").get_data(as_text=True)
    for secret in (KEY[2:], TOKEN, "keystore-password-123", "test test test"):
        assert secret.lower() not in body.lower()
    assert json.loads(body)["failureReason"].count("***") == 5
    assert "0x" + "0" * 62 + "05" in body  # ids are not mistaken for secrets

    secrets = secret_values(_settings(**settings_kw))
    log = logging.getLogger("test.secrets")
    log.addFilter(SecretFilter(secrets))
    with caplog.at_level(logging.INFO, logger="test.secrets"):
        log.info("signing with %s", KEY)
        try:
            raise ValueError(f"bad key {KEY[2:]}")
        except ValueError:
            log.exception("failed")
    text = caplog.text
    assert KEY[2:] not in text and "signing with ***" in text and "bad key ***" in text


def test_an_rpc_key_and_the_redis_password_in_text_stored_before_masking_are_masked(
    store: Store, tmp_path: Path
) -> None:
    (tmp_path / "redis-password").write_text("redis-pass-4242\n")
    taskid = _task(6, "")["chainTaskId"]
    url = "https://rpc.example/v3/KEY99999"
    store.set_task_fields(taskid, {"failureReason": f"node {url} down; auth redis-pass-4242"})
    client = _app(
        store, chain_rpc_url=url, redis_password_file=str(tmp_path / "redis-password")
    ).test_client()
    body = client.get(f"/api/v1/tasks/{taskid}").get_data(as_text=True)
    assert "KEY99999" not in body and "redis-pass-4242" not in body
    assert json.loads(body)["failureReason"] == "node *** down; auth ***"


# ---- workers, pagination, health, metrics -----------------------------------------------------


def test_worker_status_is_derived_from_heartbeats_and_pauses() -> None:
    now = utcnow()
    fresh = {"address": ALIVE_WORKER, "lastSeen": now - dt.timedelta(seconds=2)}
    assert worker_view(fresh, 30, now)["status"] == "ALIVE"
    assert worker_view(fresh, 30, now)["heartbeatAge"] == pytest.approx(2, abs=0.01)
    assert worker_view({**fresh, "status": "LOST"}, 30, now)["status"] == "LOST"
    stale = {**fresh, "lastSeen": now - dt.timedelta(seconds=60)}
    assert worker_view(stale, 30, now)["status"] == "LOST"
    # the node's own heartbeat in Redis is fresher than Mongo's lastSeen: it counts
    seen = now.replace(tzinfo=dt.UTC).timestamp() - 1
    assert worker_view(stale, 30, now, seen)["status"] == "ALIVE"
    assert worker_view({"address": ALIVE_WORKER}, 30, now)["status"] == "LOST"
    paused = {**fresh, "pausedUntil": now + dt.timedelta(minutes=5)}
    assert worker_view(paused, 30, now)["status"] == "PAUSED"


def test_workers_and_pool_summary_count_alive_lost_and_slots(store: Store) -> None:
    client = _app(store).test_client()
    workers = client.get("/api/v1/workers").get_json()
    assert [(w["address"], w["status"]) for w in workers["items"]] == [
        (ALIVE_WORKER, "ALIVE"),
        (LOST_WORKER, "LOST"),
    ]
    assert client.get("/api/v1/workers?status=LOST").get_json()["total"] == 1
    pool = client.get("/api/v1/pool").get_json()
    assert pool["owner"] == OWNER and pool["chainId"] == 65535
    assert pool["workers"] == {"alive": 1, "lost": 1, "other": 0, "total": 2}
    assert pool["slots"] == {"total": 4, "used": 1, "free": 3}  # lost workers' slots don't count
    assert pool["listener"] == {"block": 98, "startBlock": 90, "confirmations": 0, "lag": 2}
    assert pool["tasks"]["byStatus"] == {"RECEIVED": 119, "INITIALIZING": 1}
    assert pool["backlog"]["initialize"] == 120


def test_pagination_bounds(store: Store) -> None:
    client = _app(store).test_client()
    assert len(client.get("/api/v1/tasks?per_page=200").get_json()["items"]) == 120
    pages = [client.get(f"/api/v1/tasks?page={p}").get_json() for p in (1, 2, 3, 4)]
    assert [len(p["items"]) for p in pages] == [50, 50, 20, 0]
    assert {p["pages"] for p in pages} == {3} and {p["total"] for p in pages} == {120}
    ids = [t["chainTaskId"] for p in pages for t in p["items"]]
    assert len(set(ids)) == 120
    for query in ("per_page=0", "per_page=201", "page=0", "page=1.5", "per_page=", "page=-1"):
        response = client.get(f"/api/v1/tasks?{query}")
        assert response.status_code == 400, query
        assert response.get_json()["error"]["message"].startswith(query.split("=")[0])


def test_healthz_fails_when_the_listener_lags_past_the_bound(store: Store) -> None:
    assert _app(store, head=100).test_client().get("/healthz").status_code == 200
    behind = _app(store, head=200, api_max_lag=20).test_client().get("/healthz")
    assert behind.status_code == 503
    listener = behind.get_json()["checks"]["listener"]
    assert listener == {
        "ok": False,
        "lag": 102,
        "maxLag": 20,
        "error": "listener is 102 blocks behind",
    }


def _metrics(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_each_app_has_its_own_metrics_registry(store: Store) -> None:
    other = Store(mongomock.MongoClient()["other"])
    first, second = _app(store).test_client(), _app(other, head=5).test_client()
    a, b = _metrics(first), _metrics(second)
    assert a[("workerpool_tasks", (("status", "RECEIVED"),))] == 119
    assert b[("workerpool_tasks", (("status", "RECEIVED"),))] == 0
    assert a[("workerpool_chain_head_block", ())] == 100
    assert b[("workerpool_chain_head_block", ())] == 5
    assert a[("workerpool_workers", (("status", "LOST"),))] == 1
    assert a[("workerpool_worker_slots", (("state", "free"),))] == 3


# ---- the commands ----------------------------------------------------------------------------


@pytest.fixture
def served(store: Store) -> Iterator[str]:
    with serve(_app(store)) as url:
        yield url


def test_status_command_prints_the_summary(served: str) -> None:
    result = CliRunner().invoke(main, ["status", "--api", served, "--tasks", "3"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"pool     {POOL}" in out and f"owner {OWNER}" in out
    assert "listener at 98 (lag 2)" in out and "health   ok" in out
    assert "workers  1 alive, 1 lost; slots 1/4 used" in out
    assert "tasks    120: RECEIVED 119 · INITIALIZING 1" in out
    assert "latest tasks (3 of 120)" in out
    assert re.search(rf"{ALIVE_WORKER}\s+a\s+ALIVE\s+\d+\.\ds ago\s+1/4", out), out
    raw = CliRunner().invoke(main, ["status", "--api", served, "--json"])
    assert json.loads(raw.output)["pool"]["address"] == POOL


def test_status_command_exits_3_when_the_api_does_not_answer() -> None:
    result = CliRunner().invoke(main, ["status", "--api", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 3
    assert "the status API does not answer" in result.output


def test_api_command_serves_the_app_with_waitress(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IEXEC_", "WORKERPOOL_"))},
        "MONGO_URL": "mongomock://",
        "POOL_ADDRESS": POOL,
        "WORKERPOOL_REDIS_URL": redis_url,
        "IEXEC_CORE_PORT": str(port),
        "WORKERPOOL_API_HOST": "127.0.0.1",
        "PYTHONPATH": str(ROOT),
    }
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "api"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        response = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/api/v1/pool", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        assert response is not None, log.read_text()
        assert response.status_code == 200 and response.json()["address"].lower() == POOL
        assert response.headers["Server"] == "workerpool"
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status_code == 503  # no chain configured: said, not crashed
        assert health.json()["checks"]["redis"]["ok"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    text = log.read_text()
    assert f"workerpool API on http://127.0.0.1:{port}/ (read-only)" in text
    assert "empty, in-memory store" in text and "workerpool standalone" in text


def test_every_metric_the_alerts_and_grafana_read_is_exported(store: Store) -> None:
    """ops/compose's alerts and Grafana dashboard query these names: they must exist."""
    compose = ROOT / "ops" / "compose"
    texts = [
        (compose / "alerts.yml").read_text(),
        (compose / "grafana" / "dashboards" / "workerpool.json").read_text(),
    ]
    used = {m for text in texts for m in re.findall(r"\b(workerpool_[a-z0-9_]+)\b", text)}
    exported = {name for name, _ in _metrics(_app(store).test_client())}
    assert used and used <= exported, sorted(used - exported)


class FundedChainClient(FakeChainClient):
    """The chain of a pool whose owner holds ``stake`` nRLC and ``wei`` of gas money."""

    def __init__(self, stake: int, wei: int) -> None:
        super().__init__()
        self.stake, self.wei = stake, wei

    def view_account(self, address: str) -> Any:
        from poco.types import Account

        assert address == OWNER
        return Account(stake=self.stake, locked=7)

    def native_balance(self, address: str) -> int:
        return self.wei

    def fees(self) -> dict[str, int]:
        return {"maxFeePerGas": 10**9, "maxPriorityFeePerGas": 0}  # 1 gwei


def test_healthz_warns_when_the_owner_cannot_back_its_orders_or_pay_for_gas(store: Store) -> None:
    from orders.store import OrderStore

    rlc = 10**9
    orders = OrderStore(store.db).orders
    for i, (signer, status, price, remaining) in enumerate(
        [
            (OWNER, "open", 10 * rlc, 5),  # 30 % of 10 RLC x 5 tasks: 15 RLC
            (OWNER, "dead", 10 * rlc, 2),  # dead for want of stake, still valid on chain: 6
            (OWNER, "unpublished", 10 * rlc, 9),  # withdrawn from the book: not counted
            (OWNER, "filled", 10 * rlc, 0),
            ("0x" + "99" * 20, "open", 100 * rlc, 9),  # another signer's
        ]
    ):
        orders.insert_one(
            {
                "orderHash": f"0x{i:064x}",
                "status": status,
                "keys": {"signer": signer.lower()},
                "order": {"workerpoolprice": price},
                "remaining": remaining,
            }
        )

    def health(stake: int, wei: int) -> Any:
        settings = _settings()
        app = create_app(
            settings,
            store,
            redis=fakeredis.FakeRedis(),
            chain=ChainProbe(settings, FundedChainClient(stake, wei)),
        )
        return app.test_client().get("/healthz")

    # Given 20 RLC of free stake for 21 RLC of pool stake: a warning, the pool still healthy
    short = health(20 * rlc, 10**18)
    assert short.status_code == 200
    body = short.get_json()
    assert body["funds"] == {
        "owner": OWNER,
        "stake": 20 * rlc,
        "locked": 7,
        "ordersNeed": 21 * rlc,
        "gas": {"wei": 10**18, "transactions": 1000},
    }
    (warning,) = body["warnings"]
    assert "free stake (20 RLC) does not cover its 2 published order(s)" in warning
    assert "7 remaining task(s) locks 21 RLC" in warning and "deposit 1 RLC more" in warning
    # With enough stake: no warning
    assert health(21 * rlc, 10**18).get_json()["warnings"] == []
    # Gas for fewer than 10 transactions of 1,000,000 gas at the node's fee: a warning
    low = health(21 * rlc, 5 * 10**15).get_json()["warnings"]
    assert low == [
        f"scheduler wallet: gas balance is very low: {OWNER} holds 0.005 ETH for gas, "
        "5 transaction(s) left"
    ]
    empty = health(21 * rlc, 10**14).get_json()["warnings"]
    assert "gas balance is empty" in empty[0] and "please refill it" in empty[0]


def test_healthz_fails_on_a_node_of_another_chain(store: Store) -> None:
    # the fake node reports chain 65535; the settings name Arbitrum One
    response = _app(store, chain="arbitrum-mainnet").test_client().get("/healthz")
    assert response.status_code == 503
    chain = response.get_json()["checks"]["chain"]
    assert chain["ok"] is False
    assert chain["error"] == "the node reports chain 65535, the settings name chain 42161"
