"""Helpers of the API tests: serve an app over real HTTP (waitress, as `workerpool api` does)
and keep one pool running for a whole test module (tests/test_api.py reads the store of one
real devnet run from many tests; ``running_pool`` is per test)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mongomock_ng as mongomock
import redis
from celery.contrib.testing.worker import start_worker
from devnet_fixtures import DevnetHandle
from pool_fixtures import ROOT, RunningPool

from poco.chain import ChainClient
from pool.celery_app import SCHEDULER_QUEUE
from pool.settings import Settings
from pool.store import Store
from scheduler.service import Scheduler
from scheduler.tasks import create_scheduler_app


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with waitress on a free port of 127.0.0.1; yields its base URL."""
    from waitress.server import create_server

    server: Any = create_server(app, host="127.0.0.1", port=0, threads=8, ident="test")
    thread = threading.Thread(target=server.run, daemon=True, name="api")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.task_dispatcher.shutdown()
        server.close()
        thread.join(timeout=10)


def pool_env(devnet: DevnetHandle, redis_url: str, ipfs_api_url: str) -> dict[str, str]:
    """The environment of tests/pool_fixtures.py's running pool."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IEXEC_", "WORKERPOOL_"))},
        "IEXEC_PRIVATE_CHAIN_ADDRESS": devnet.info["rpc_url"],
        "IEXEC_HUB_ADDRESS": devnet.info["hub"],
        "POOL_ADDRESS": devnet.info["workerpool"],
        "WORKERPOOL_DEVNET": "1",
        "WORKERPOOL_REDIS_URL": redis_url,
        "IEXEC_IPFS_HOST": ipfs_api_url.split("//")[1].split(":")[0],
        "IEXEC_IPFS_PORT": ipfs_api_url.rsplit(":", 1)[1],
        "WORKERPOOL_RESULT_STORAGE": "ipfs",
        "WORKERPOOL_APP_OUTPUT_LIMIT_MB": "5",
        "WORKERPOOL_WORKER_SLOTS": "2",
        "WORKERPOOL_HEARTBEAT_PERIOD": "1",
        "WORKER_LOST_TIMEOUT": "5",
        "PYTHONPATH": str(ROOT),
    }


@contextmanager
def module_pool(
    devnet: DevnetHandle, redis_url: str, ipfs_api_url: str, tmp: Path
) -> Iterator[RunningPool]:
    """The same pool as the ``running_pool`` fixture, for a module-scoped fixture."""
    redis.Redis.from_url(redis_url).flushdb()
    env = pool_env(devnet, redis_url, ipfs_api_url)
    settings = Settings.from_env(
        {**env, "IEXEC_START_BLOCK_NUMBER": str(devnet.client.block_number() + 1)}
    )
    store = Store(mongomock.MongoClient()["api"])
    store.ensure_indexes()
    client = ChainClient(devnet.info["rpc_url"], devnet.info["hub"])
    scheduler = Scheduler(
        settings,
        store,
        client,
        client.wallet(devnet.key("scheduler")),
        None,  # set below
        redis.Redis.from_url(redis_url),
    )
    app = create_scheduler_app(settings, scheduler)
    scheduler.celery = app
    stop = threading.Event()

    def ticking() -> None:
        while not stop.is_set():
            try:
                scheduler.tick()
            except Exception as exc:
                print(f"tick failed: {exc!r}")
            stop.wait(0.3)

    ticker = threading.Thread(target=ticking, daemon=True)
    with start_worker(
        app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        queues=[SCHEDULER_QUEUE],
        shutdown_timeout=20,
    ):
        ticker.start()
        pool = RunningPool(devnet, scheduler, store, env, tmp)
        try:
            yield pool
        finally:
            stop.set()
            ticker.join(timeout=10)
            pool.stop_workers()


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
