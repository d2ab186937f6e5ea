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
* ``init-once``: ``scheduler.service.Scheduler.initialize`` reads the RECEIVED tasks once per
  tick (ids only) and sends them in batches, instead of one sorted query per batch.
* ``reconcile-batch``: ``scheduler.lifecycle.Lifecycle.reconcile`` reads the contributing
  tasks with a projection (id, queue, waitingReason: not whole documents with their
  timelines), their replicates in one ``$in`` query per 1,000 tasks, and counts the serving
  workers once per queue, instead of two queries per running task per tick.
"""

from __future__ import annotations

import os
import time
from typing import Any

ALL = ("chainid-cache", "runner-poll", "fees-cache", "init-once", "reconcile-batch")


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


def _init_once() -> None:
    from pool.states import TaskStatus
    from scheduler import service

    def initialize(self: Any, report: Any) -> None:
        leftovers = self.store.tasks_in([TaskStatus.INITIALIZING])
        for task in leftovers:
            self._reconcile_initializing(task)
        pending = list(
            self.store.tasks.find(
                {"status": str(TaskStatus.RECEIVED)},
                {"_id": 0, "chainTaskId": 1, "chainDealId": 1, "index": 1, "finalDeadline": 1},
            ).sort([("finalDeadline", 1), ("chainTaskId", 1)])
        )
        size = self.settings.init_batch_size
        for start in range(0, len(pending), size):
            batch = pending[start : start + size]
            for task in batch:
                self.store.transition_task(task["chainTaskId"], TaskStatus.INITIALIZING)
            self._initialize_batch(batch, report)

    service.Scheduler.initialize = initialize  # type: ignore[method-assign]


def _reconcile_batch() -> None:
    from pool.states import TaskStatus
    from scheduler import lifecycle as lc

    R, T = lc.R, lc.T

    def reconcile(self: Any, report: Any) -> None:
        now = self.client.block_timestamp()
        self.claim_expired(now, report)
        self.contribution_timeouts(now)
        self.reveal_timeouts(now)
        self.upload_timeouts()
        self.detect_lost_workers()
        tasks = list(
            self.store.tasks.find(
                {"status": {"$in": [str(x) for x in lc.CONTRIBUTING]}},
                {"_id": 0, "chainTaskId": 1, "queue": 1, "waitingReason": 1},
            )
        )
        ids = [t["chainTaskId"] for t in tasks]
        reps: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(ids), 1000):
            for r in self.store.replicates.find(
                {"chainTaskId": {"$in": ids[start : start + 1000]}},
                {"_id": 0, "chainTaskId": 1, "status": 1},
            ):
                reps.setdefault(r["chainTaskId"], []).append(r)
        serving: dict[str, int] = {}
        for task in tasks:
            taskid = task["chainTaskId"]
            mine = reps.get(taskid, [])
            if not mine:
                queue = task["queue"]
                if queue not in serving:
                    capability = lc.QUEUE_CAPABILITY.get(queue, queue)
                    serving[queue] = self.store.workers.count_documents(
                        {"status": "ALIVE", "capabilities": capability}
                    )
                reason = "" if serving[queue] else f"waiting: no live worker serves {queue}"
                if task.get("waitingReason", "") != reason:
                    self.store.set_task_fields(taskid, {"waitingReason": reason})
            elif any(r["status"] == str(R.CONTRIBUTED) for r in mine):
                if not self.check_consensus(taskid):
                    self.replan(taskid)
            elif not any(r["status"] in lc.IN_FLIGHT for r in mine):
                self.replan(taskid)  # replan() itself returns at once while one is in flight
        for task in self.store.tasks_in([TaskStatus(x) for x in lc.REVEAL_PHASE]):
            self.request_reveals(task["chainTaskId"])
        for task in self.store.tasks_in([T.AT_LEAST_ONE_REVEALED]):
            self.request_upload(task["chainTaskId"])
        for task in self.store.tasks_in([T.RESULT_UPLOADED, T.FINALIZE_FAILED]):
            self.finalize(task["chainTaskId"])

    lc.Lifecycle.reconcile = reconcile  # type: ignore[method-assign]
