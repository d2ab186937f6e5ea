"""Reads of the pool's state shared by the JSON routes, the dashboard, /healthz and /metrics.

Everything is computed from MongoDB (the scheduler's source of truth), Redis (queue depths)
and the chain at request time: the API is a separate process from the scheduler and the
workers, so it keeps no counters of its own and any number of API processes agree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from typing import Any

from api.common import age_seconds
from api.context import ApiContext, ChainFacts
from pool import keys
from pool.clock import utcnow
from pool.messages import REPLICATE_QUEUES, SCHEDULER_QUEUE, Refusals, heartbeat_time
from pool.states import DealStatus, ReplicateStatus, TaskStatus, WorkerStatus

T = TaskStatus
R = ReplicateStatus

QUEUES = [SCHEDULER_QUEUE, *REPLICATE_QUEUES.values()]

# Where a live task waits, for the backlog metric and the dashboard: stage -> statuses.
BACKLOG_STAGES: dict[str, tuple[TaskStatus, ...]] = {
    "initialize": (T.RECEIVED, T.INITIALIZING),
    "compute": (T.INITIALIZED, T.RUNNING, T.REOPENING, T.REOPENED),
    "reveal": (T.CONSENSUS_REACHED, T.AT_LEAST_ONE_REVEALED),
    "upload": (T.RESULT_UPLOADING,),
    "finalize": (T.RESULT_UPLOADED, T.FINALIZING, T.FINALIZE_FAILED, T.FINALIZED),
    "deadline": (T.CONTRIBUTION_TIMEOUT, T.FINAL_DEADLINE_REACHED, T.INITIALIZE_FAILED),
}

# Timeline entries that stand for a transaction, by who sends it: (collection, status) -> tx.
TX_SENT: dict[tuple[str, str], str] = {
    ("tasks", str(T.INITIALIZED)): "initialize",
    ("tasks", str(T.FINALIZED)): "finalize",
    ("tasks", str(T.FAILED)): "claim",
    ("replicates", str(R.CONTRIBUTED)): "contribute",
    ("replicates", str(R.REVEALED)): "reveal",
    # trust 1: the worker's contributeAndFinalize (a classic COMPLETED carries no hash)
    ("replicates", str(R.COMPLETED)): "contributeAndFinalize",
}
TX_FAILED: dict[tuple[str, str], str] = {
    ("tasks", str(T.INITIALIZE_FAILED)): "initialize",
    ("tasks", str(T.FINALIZE_FAILED)): "finalize",
    ("replicates", str(R.CONTRIBUTE_FAILED)): "contribute",
    ("replicates", str(R.REVEAL_FAILED)): "reveal",
}

# ---- workers ------------------------------------------------------------------------------
ALIVE, LOST, PAUSED = WorkerStatus.ALIVE, WorkerStatus.LOST, WorkerStatus.PAUSED
WORKER_STATUSES = [str(s) for s in WorkerStatus]


def worker_view(
    doc: dict[str, Any], lost_after: float, now: dt.datetime, seen: float | None = None
) -> dict[str, Any]:
    """A worker as the API shows it, with its heartbeat age and a derived status:

    * LOST when the scheduler marked it so, or when its last heartbeat is older than
      ``WORKER_LOST_TIMEOUT`` (even before the scheduler notices);
    * PAUSED while the scheduler refuses it work after repeated failures (``pausedUntil``);
    * ALIVE otherwise.

    ``seen`` is the time of the signed heartbeat nodes write straight into Redis (Unix
    seconds, its signature checked); the fresher of it and Mongo's ``lastSeen`` counts, as in
    the scheduler's own detector.
    """
    age = age_seconds(doc.get("lastSeen"), now)
    if seen is not None:
        redis_age = max(0.0, round(now.replace(tzinfo=dt.UTC).timestamp() - seen, 3))
        age = redis_age if age is None else min(age, redis_age)
    paused = doc.get("pausedUntil")
    if doc.get("status") == LOST or age is None or age > lost_after:
        status = LOST
    elif isinstance(paused, dt.datetime) and paused > now:
        status = PAUSED
    else:
        status = ALIVE
    return {**doc, "status": str(status), "heartbeatAge": age}


def worker_views(ctx: ApiContext, now: dt.datetime) -> list[dict[str, Any]]:
    """Every worker, by address, with its derived status. Workers are few (one document per
    node), so they are read whole and filtered here, where the status is known."""
    docs = ctx.store.all_workers()
    seen: list[Any] = [None] * len(docs)
    domain = ctx.domain() if docs else None
    if domain is not None:  # (the chain id unknown: Mongo's lastSeen alone)
        with contextlib.suppress(Exception):  # Redis down: Mongo's lastSeen alone
            seen = list(ctx.redis.mget([keys.node_seen(doc.get("address", "")) for doc in docs]))
    views = []
    for doc, raw in zip(docs, seen, strict=True):
        when = None
        if raw is not None and domain is not None:
            when = heartbeat_time(raw, str(doc.get("address", "")), domain)
        views.append(worker_view(doc, ctx.lost_after, now, when))
    return views


def _count(value: Any) -> int:
    """A count read from a document (0 when it is not a non-negative integer)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def workers_summary(ctx: ApiContext, now: dt.datetime) -> dict[str, Any]:
    """Workers by derived status, and the slots of the live ones (from their heartbeats)."""
    by_status = {str(s): 0 for s in WorkerStatus}
    slots = busy = 0
    for view in worker_views(ctx, now):
        status = view["status"]
        by_status[status] = by_status.get(status, 0) + 1
        if status == LOST:
            continue
        slots += _count(view.get("slots"))
        busy += min(_count(view.get("busySlots")), _count(view.get("slots")))
    alive, lost = by_status[str(ALIVE)], by_status[str(LOST)]
    total = sum(by_status.values())
    return {
        "workers": {"alive": alive, "lost": lost, "other": total - alive - lost, "total": total},
        "byStatus": by_status,
        "slots": {"total": slots, "used": busy, "free": slots - busy},
    }


# ---- counts ---------------------------------------------------------------------------------
def queue_depths(ctx: ApiContext) -> tuple[dict[str, int | None], str | None]:
    """LLEN of each Celery queue (the Redis list named after it); None when Redis is down."""
    try:
        pipe = ctx.redis.pipeline(transaction=False)
        for name in QUEUES:
            pipe.llen(name)
        depths = [int(n) for n in pipe.execute()]
    except Exception as exc:
        return {name: None for name in QUEUES}, f"redis unavailable: {type(exc).__name__}"
    return dict(zip(QUEUES, depths, strict=True)), None


def refused_messages(ctx: ApiContext) -> dict[tuple[str, str], int]:
    """Worker messages the scheduler refused, by (message, reason) (counted in Redis)."""
    return Refusals(ctx.redis).read()


def listener_position(ctx: ApiContext, head: int | None) -> dict[str, Any]:
    """The chain listener's cursor and how far it is behind the head it may read
    (head - confirmations). Before its first range the listener stands just before
    IEXEC_START_BLOCK_NUMBER."""
    settings = ctx.settings
    cursor = None
    if settings.pool_address:
        cursor = ctx.store.get_cursor(f"SchedulerNotice:{str(settings.pool_address).lower()}")
    position = cursor if cursor is not None else settings.start_block - 1
    lag = None
    if head is not None:
        lag = max(0, head - settings.confirmations - position)
    return {
        "block": cursor,
        "startBlock": settings.start_block,
        "confirmations": settings.confirmations,
        "lag": lag,
    }


def pool_summary(ctx: ApiContext) -> dict[str, Any]:
    """The pool page: identity, chain, listener, workers, slots, queues, deals, tasks."""
    now = utcnow()
    chain: ChainFacts = ctx.chain.facts()
    store = ctx.store
    queues, queue_error = queue_depths(ctx)
    deals = store.count_by_status("deals")
    tasks = store.count_by_status("tasks")
    return {
        "address": ctx.settings.pool_address,
        "owner": chain.owner,
        "chainId": chain.chain_id if chain.chain_id is not None else ctx.settings.chain_id or None,
        "hub": ctx.settings.hub_address,
        "chain": {"reachable": chain.reachable, "headBlock": chain.head, "error": chain.error},
        "listener": listener_position(ctx, chain.head),
        **{k: v for k, v in workers_summary(ctx, now).items() if k != "byStatus"},
        "queues": queues,
        "queuesError": queue_error,
        "deals": {"total": sum(deals.values()), "byStatus": _ordered(deals, DealStatus)},
        "tasks": {"total": sum(tasks.values()), "byStatus": _ordered(tasks, TaskStatus)},
        "backlog": {
            stage: sum(tasks.get(str(s), 0) for s in statuses)
            for stage, statuses in BACKLOG_STAGES.items()
        },
        "generatedAt": now.isoformat(timespec="milliseconds") + "Z",
    }


def _ordered(counts: dict[str, int], enum: Any) -> dict[str, int]:
    """Counts in the lifecycle's order, zeros left out."""
    known = [str(s) for s in enum]
    ordered = {s: counts[s] for s in known if counts.get(s)}
    ordered.update({s: n for s, n in sorted(counts.items()) if s not in ordered and n})
    return ordered


# ---- transactions ---------------------------------------------------------------------------
def transactions(ctx: ApiContext) -> tuple[dict[str, int], dict[str, int]]:
    """Transactions sent (distinct tx hashes in the timelines) and failed (failure statuses)
    per kind. One initializeArray initializes a batch of tasks: its hash is counted once."""
    sent = {kind: 0 for kind in sorted(set(TX_SENT.values()))}
    failed = {kind: 0 for kind in sorted(set(TX_FAILED.values()))}
    collections = ("tasks", "replicates")
    hashes, entries = ctx.store.transactions(
        {c: [s for (name, s) in TX_SENT if name == c] for c in collections},
        {c: [s for (name, s) in TX_FAILED if name == c] for c in collections},
    )
    for key, n in hashes.items():
        sent[TX_SENT[key]] += n
    for key, n in entries.items():
        failed[TX_FAILED[key]] += n
    return sent, failed
