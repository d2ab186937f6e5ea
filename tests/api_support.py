"""Helpers of the API tests: serve an app over real HTTP (waitress, as `workerpool api` does)
and keep one pool running for a whole test module (tests/test_api.py reads the store of one
real devnet run from many tests; ``running_pool`` is per test)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from devnet_fixtures import DevnetHandle
from pool_fixtures import RunningPool, pool_running


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


@contextmanager
def module_pool(
    devnet: DevnetHandle, redis_url: str, ipfs_api_url: str, tmp: Path
) -> Iterator[RunningPool]:
    """The same pool as the ``running_pool`` fixture, for a module-scoped fixture."""
    redis.Redis.from_url(redis_url).flushdb()
    with pool_running(devnet, redis_url, ipfs_api_url, tmp, db="api") as pool:
        yield pool


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
