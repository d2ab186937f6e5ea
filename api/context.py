"""What every blueprint of the API reads: the store, Redis and the chain, opened lazily.

``create_app(settings)`` must not connect to anything (the app is built at start-up, in tests
and in ``workerpool standalone`` before the services it reads may be up), so the store, the
Redis client and the chain client are built on first use. The chain is read through
:class:`ChainProbe`, which caches what it learns for a moment and never retries: the API is
polled by a dashboard and scraped by Prometheus, and a slow or dead chain node must turn
into a quick "unreachable" rather than requests piling up behind the client's backoff.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app

from pool.messages import Domain
from pool.settings import Settings
from pool.store import Store

log = logging.getLogger(__name__)

EXTENSION = "workerpool"
T = TypeVar("T")

# How long chain facts are reused. The head moves every block (seconds); the owner and the
# chain id practically never change.
HEAD_TTL = 1.0
OWNER_TTL = 60.0
FUNDS_TTL = 10.0  # the owner's stake and gas (they move with each deal and transaction)
CHAIN_TIMEOUT = 3.0


@dataclass
class ChainFacts:
    """What the API knows about the chain right now; ``error`` says why a value is None."""

    reachable: bool
    head: int | None = None
    chain_id: int | None = None
    owner: str | None = None
    error: str | None = None


class ChainProbe:
    """Reads head block, chain id and pool owner with a short timeout, no retries, and a
    small cache (failures are cached too, so a dead node costs one timeout per second)."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.settings = settings
        self._client = client
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}

    @property
    def configured(self) -> bool:
        return bool(self.settings.chain_rpc_url and self.settings.hub_address)

    def client(self) -> Any:
        if self._client is None:
            from poco.chain import ChainClient

            self._client = ChainClient(
                str(self.settings.chain_rpc_url),
                str(self.settings.hub_address),
                request_timeout=CHAIN_TIMEOUT,
                retries=0,
            )
        return self._client

    def _cached(self, key: str, ttl: float, fetch: Callable[[], T]) -> T:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < ttl:
                value = hit[1]
                if isinstance(value, Exception):
                    raise value
                return value
        try:
            value = fetch()
        except Exception as exc:
            with self._lock:
                self._cache[key] = (now, exc)
            raise
        with self._lock:
            self._cache[key] = (now, value)
        return value

    def facts(self) -> ChainFacts:
        if not self.configured:
            return ChainFacts(
                False, error="chain not configured (IEXEC_PRIVATE_CHAIN_ADDRESS, IEXEC_HUB_ADDRESS)"
            )
        try:
            head = self._cached("head", HEAD_TTL, lambda: int(self.client().block_number()))
            chain_id = self._cached("chain_id", OWNER_TTL, lambda: int(self.client().chain_id))
        except Exception as exc:
            return ChainFacts(False, error=f"chain node unreachable: {type(exc).__name__}")
        owner = None
        if self.settings.pool_address:
            try:
                owner = self._cached(
                    "owner",
                    OWNER_TTL,
                    lambda: str(self.client().workerpool_owner(str(self.settings.pool_address))),
                )
            except Exception as exc:  # a wrong POOL_ADDRESS should not hide the head block
                log.debug("pool owner unavailable: %s", exc)
        return ChainFacts(True, head=head, chain_id=chain_id, owner=owner)

    def owner_funds(self, owner: str) -> OwnerFunds:
        """The owner's free and locked stake and its gas, read at most every FUNDS_TTL."""

        def read() -> OwnerFunds:
            from poco.funds import gas_check

            client = self.client()
            account = client.view_account(owner)
            budget = int(self.settings.gas_price_budget_gwei * 10**9)
            return OwnerFunds(account.stake, account.locked, gas_check(client, owner, budget))

        return self._cached(f"funds:{owner.lower()}", FUNDS_TTL, read)


@dataclass(frozen=True)
class OwnerFunds:
    """The workerpool owner's (the scheduler wallet's) PoCo account and gas."""

    stake: int
    locked: int
    gas: Any  # poco.funds.GasCheck


class ApiContext:
    """The services one app reads, each built on first use from the settings."""

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        redis: Any = None,
        chain: ChainProbe | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self._redis = redis
        self.chain = chain or ChainProbe(settings)
        self._lock = threading.Lock()
        self._domain: Domain | None = None

    @property
    def store(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.settings)
            return self._store

    @property
    def redis(self) -> Any:
        with self._lock:
            if self._redis is None:
                from pool.broker import redis_client

                self._redis = redis_client(
                    self.settings, socket_timeout=2, socket_connect_timeout=2
                )
            return self._redis

    def domain(self) -> Domain | None:
        """The domain the workers sign their heartbeats in (this chain, POOL_ADDRESS), once
        the chain id is known (IEXEC_CHAIN_ID, or the chain node); None before."""
        if self._domain is None and self.settings.pool_address:
            chain_id = self.settings.chain_id or self.chain.facts().chain_id
            if chain_id:
                self._domain = Domain(chain_id, str(self.settings.pool_address))
        return self._domain

    @property
    def lost_after(self) -> float:
        """Seconds without a heartbeat after which the API shows a worker as LOST (the
        scheduler's own threshold when it has one, so both agree)."""
        return float(getattr(self.settings, "worker_lost_timeout", 30.0))


def open_store(settings: Settings) -> Store:
    """The store for a reader: unlike :func:`pool.store.connect` it creates no index (the
    scheduler does), so the API also runs with a read-only MongoDB user."""
    uri = settings.mongo_uri()
    if uri.startswith("mongomock://"):
        from pool.store import connect

        return connect(settings)
    import pymongo

    client: Any = pymongo.MongoClient(uri, serverSelectionTimeoutMS=3000, tz_aware=False)
    return Store(client[settings.mongo_db])


def ctx() -> ApiContext:
    """The context of the app serving the current request."""
    context: ApiContext = current_app.extensions[EXTENSION]
    return context
