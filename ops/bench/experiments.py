"""Prototypes of the changes the benchmarks point at, applied by monkeypatching in the
benchmark's processes only (``--try NAME,...``; worker processes get them through
``patches/sitecustomize.py`` and the WORKERPOOL_BENCH_TRY variable). They exist to measure a
change before it is made in the product code; they are not the product. Each says which
function of the product it stands for.

* ``chainid-cache``: ``poco.chain.ChainClient.__init__`` builds its HTTPProvider with
  ``cache_allowed_requests=True, cacheable_requests={"eth_chainId"}``: web3's validation
  middleware asks the node for the chain id before every eth_call and eth_estimateGas.
* ``runner-poll``: ``workers.runner.DockerRunner`` polls the container every 0.02 s instead
  of 0.2 s (the product should block on ``container.wait`` instead of polling).
* ``fees-cache``: ``poco.chain.Wallet._fees`` reuses the fees it read for 2 s instead of
  reading the latest block and the priority fee before every transaction.

The prototypes of ``init-once`` and ``reconcile-batch`` (docs/performance.md) were removed once
the product did the same (``scheduler/initialize.py``, ``scheduler/reconcile.py``).
"""

from __future__ import annotations

import os
import time
from typing import Any

ALL = ("chainid-cache", "runner-poll", "fees-cache")


def apply(names: str | list[str] | tuple[str, ...] | None = None) -> list[str]:
    if names is None:
        names = os.environ.get("WORKERPOOL_BENCH_TRY", "")
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    done = []
    for name in names:
        if name not in ALL:
            raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(ALL)}")
        globals()["_" + name.replace("-", "_")]()
        done.append(name)
    return done


def _chainid_cache() -> None:
    from web3.providers.rpc import HTTPProvider
    from web3.types import RPCEndpoint

    orig = HTTPProvider.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        kw.setdefault("cache_allowed_requests", True)
        kw.setdefault("cacheable_requests", {RPCEndpoint("eth_chainId")})
        orig(self, *a, **kw)

    HTTPProvider.__init__ = init  # type: ignore[method-assign]


def _runner_poll() -> None:
    from workers import runner

    orig = runner.DockerRunner.__init__

    def init(self: Any, *a: Any, **kw: Any) -> None:
        kw.setdefault("poll_interval", 0.02)
        orig(self, *a, **kw)

    runner.DockerRunner.__init__ = init  # type: ignore[method-assign]


def _fees_cache() -> None:
    from poco import chain

    orig = chain.Wallet._fees
    cache: dict[str, tuple[float, dict[str, int]]] = {}

    def fees(self: Any) -> dict[str, int]:
        hit = cache.get(self.client.rpc_url)
        if hit and time.monotonic() - hit[0] < 2.0:
            return hit[1]
        value = orig(self)
        cache[self.client.rpc_url] = (time.monotonic(), value)
        return value

    chain.Wallet._fees = fees  # type: ignore[method-assign]
