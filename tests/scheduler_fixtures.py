"""Scheduler fixtures: a scheduler on the devnet, a real redis-server and a mongomock store,
driven tick by tick by the test (no Celery consumer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle

from poco.chain import ChainClient
from pool.messages import Messenger, make_celery
from pool.settings import Settings
from pool.store import Store
from scheduler.context import SchedulerContext
from scheduler.service import Scheduler
from testing.store import memory_store


@pytest.fixture
def store() -> Store:
    return memory_store()


@pytest.fixture
def make_scheduler(
    devnet: DevnetHandle, store: Store, redis_url: str, redis_client: Any
) -> Callable[..., Scheduler]:
    """Build schedulers on the devnet that start reading at the current head (so deals of
    other tests are not seen), sharing ``store`` unless another is given."""
    head = devnet.client.block_number()

    def make(target_store: Store | None = None, **overrides: Any) -> Scheduler:
        fields: dict[str, Any] = {
            "chain_rpc_url": devnet.info["rpc_url"],
            "hub_address": devnet.info["hub"],
            "pool_address": devnet.info["workerpool"],
            "start_block": head + 1,
            "redis_url": redis_url,
        }
        settings = Settings(**{**fields, **overrides})
        client = ChainClient(
            settings.chain_rpc_url or "", settings.hub_address or "", log_chunk=settings.log_range
        )
        ctx = SchedulerContext(
            settings,
            target_store or store,
            client,
            client.wallet(devnet.key("scheduler")),
            Messenger(make_celery(settings)),
            redis_client,
        )
        return Scheduler(ctx)

    return make
