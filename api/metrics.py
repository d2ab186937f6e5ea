"""``/metrics`` for Prometheus, computed from the store, Redis and the chain at scrape time.

The API is its own process: counters kept in memory here would only count what this process
did, and reset when it restarts. So every metric is read where the truth is: tasks and deals
by status, backlog per stage and replicate durations from MongoDB; transactions sent and
failed from the timelines (an entry with a tx hash is a transaction sent, a ``*_FAILED``
status a failed one); queue depths from Redis; head and listener lag from the chain and the
cursor. Each app has its own :class:`CollectorRegistry`, so several apps in one process
(tests, the standalone mode) never clash in prometheus_client's global registry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from api.context import ApiContext
from api.orders import order_rows
from api.queries import (
    BACKLOG_STAGES,
    listener_position,
    queue_depths,
    refused_messages,
    transactions,
    worker_views,
    workers_summary,
)
from pool.clock import utcnow
from pool.messages import REFUSALS
from pool.states import DealStatus, ReplicateStatus, TaskStatus

# seconds: a replicate of the echo app takes < 1 s; category XS allows 300 s, XL 36000 s
DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 10800, 36000)


class PoolCollector(Collector):
    """Reads the pool's state on every scrape; a part that does not answer is reported by
    ``workerpool_up{component}`` = 0 and its metrics are left out (never guessed)."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context

    def describe(self) -> list[Metric]:
        return []  # registering must not read the store

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "workerpool_up",
            "Whether a part the pool depends on answers (1) or not (0).",
            labels=["component"],
        )
        try:
            yield from self._store_metrics()
            up.add_metric(["mongo"], 1)
        except Exception:
            up.add_metric(["mongo"], 0)
        yield from self._queue_metrics(up)
        yield from self._chain_metrics(up)
        yield up

    # ---- MongoDB ---------------------------------------------------------------------------
    def _store_metrics(self) -> Iterator[Metric]:
        store = self.context.store
        out: list[Metric] = []  # built fully before yielding: all or nothing per scrape
        tasks = store.count_by_status("tasks")
        gauge = GaugeMetricFamily("workerpool_tasks", "Tasks by status.", labels=["status"])
        for status in TaskStatus:
            gauge.add_metric([str(status)], tasks.get(str(status), 0))
        out.append(gauge)
        backlog = GaugeMetricFamily(
            "workerpool_backlog_tasks",
            "Live tasks waiting in each stage (initialize, compute, reveal, upload, finalize, "
            "deadline).",
            labels=["stage"],
        )
        for stage, statuses in BACKLOG_STAGES.items():
            backlog.add_metric([stage], sum(tasks.get(str(s), 0) for s in statuses))
        out.append(backlog)
        deals = store.count_by_status("deals")
        gauge = GaugeMetricFamily("workerpool_deals", "Deals by status.", labels=["status"])
        for deal_status in DealStatus:
            gauge.add_metric([str(deal_status)], deals.get(str(deal_status), 0))
        out.append(gauge)
        replicates = store.count_by_status("replicates")
        gauge = GaugeMetricFamily(
            "workerpool_replicates", "Replicates by status.", labels=["status"]
        )
        for rep_status in ReplicateStatus:
            gauge.add_metric([str(rep_status)], replicates.get(str(rep_status), 0))
        out.append(gauge)
        out.append(self._durations())
        sent, failed = transactions(self.context)
        # Gauges, not counters: they are counts read from the store at each scrape (they
        # would drop if documents were deleted), and PromQL reads them with delta().
        for name, counts, what in (
            (
                "workerpool_transactions_sent",
                sent,
                "Transactions sent by the scheduler "
                "(initialize, finalize, claim) and the workers (contribute, reveal), counted from "
                "the timelines (distinct tx hashes).",
            ),
            (
                "workerpool_transactions_failed",
                failed,
                "Transactions that failed: a *_FAILED status in a timeline.",
            ),
        ):
            gauge = GaugeMetricFamily(name, what, labels=["kind"])
            for kind, n in counts.items():
                gauge.add_metric([kind], n)
            out.append(gauge)
        out.extend(self._workers())
        out.append(self._orders())
        yield from out

    def _durations(self) -> Metric:
        values = self.context.store.replicate_durations()
        buckets: list[tuple[str, float]] = []
        for bound in DURATION_BUCKETS:
            buckets.append((_le(bound), float(sum(1 for v in values if v <= bound))))
        buckets.append(("+Inf", float(len(values))))
        return HistogramMetricFamily(
            "workerpool_replicate_duration_seconds",
            "Wall time of the app's container per replicate, as the workers reported it.",
            buckets=buckets,
            sum_value=sum(values),
        )

    def _workers(self) -> list[Metric]:
        now = utcnow()
        summary = workers_summary(self.context, now)
        workers = GaugeMetricFamily(
            "workerpool_workers",
            "Worker nodes by status (as /api/v1/workers shows them).",
            labels=["status"],
        )
        for status, n in summary["byStatus"].items():
            workers.add_metric([status], n)
        slots = GaugeMetricFamily(
            "workerpool_worker_slots", "Slots of live workers.", labels=["state"]
        )
        slots.add_metric(["used"], summary["slots"]["used"])
        slots.add_metric(["free"], summary["slots"]["free"])
        age = GaugeMetricFamily(
            "workerpool_worker_heartbeat_age_seconds",
            "Seconds since each worker's last heartbeat.",
            labels=["worker", "name", "status"],
        )
        for view in worker_views(self.context, now):
            if view["heartbeatAge"] is not None:
                age.add_metric(
                    [str(view.get("address", "")), str(view.get("name", "")), view["status"]],
                    view["heartbeatAge"],
                )
        return [workers, slots, age]

    def _orders(self) -> Metric:
        gauge = GaugeMetricFamily(
            "workerpool_order_remaining_volume",
            "Tasks each published workerpool order can still sell.",
            labels=["order", "category", "status"],
        )
        for row in order_rows(self.context, limit=500):
            if row.get("remaining") is not None:
                gauge.add_metric(
                    [str(row["orderHash"]), str(row.get("category", "")), str(row.get("status"))],
                    float(row["remaining"]),
                )
        return gauge

    # ---- Redis and the chain ---------------------------------------------------------------
    def _queue_metrics(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        depths, error = queue_depths(self.context)
        up.add_metric(["redis"], 0 if error else 1)
        if error:
            return
        gauge = GaugeMetricFamily(
            "workerpool_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for name, depth in depths.items():
            gauge.add_metric([name], depth or 0)
        yield gauge
        refused = GaugeMetricFamily(
            "workerpool_messages_refused",
            "Worker messages the scheduler refused (forged, replayed, stale, a claim the "
            "chain does not confirm ...), by message and reason, since Redis was emptied.",
            labels=["message", "reason"],
        )
        # every pair a message can be refused for, from 0: delta() sees the first refusal
        counts = {(m, r): 0 for m, reasons in REFUSALS.items() for r in reasons}
        with contextlib.suppress(Exception):  # a hash that is no longer one: zeros
            counts.update(refused_messages(self.context))
        for (message, reason), n in sorted(counts.items()):
            refused.add_metric([message.rpartition(".")[2], reason], n)
        yield refused

    def _chain_metrics(self, up: GaugeMetricFamily) -> Iterator[Metric]:
        facts = self.context.chain.facts()
        up.add_metric(["chain"], 1 if facts.reachable else 0)
        yield GaugeMetricFamily(
            "workerpool_chain_reachable",
            "Whether the chain node answers (1) or not (0).",
            value=1 if facts.reachable else 0,
        )
        if facts.head is None:
            return
        yield GaugeMetricFamily("workerpool_chain_head_block", "Head block.", value=facts.head)
        try:
            position: dict[str, Any] = listener_position(self.context, facts.head)
        except Exception:
            return
        if position["block"] is not None:
            yield GaugeMetricFamily(
                "workerpool_listener_block",
                "Last block the chain listener has read.",
                value=position["block"],
            )
        yield GaugeMetricFamily(
            "workerpool_listener_lag_blocks",
            "Blocks the listener is behind the head it may read (head - confirmations).",
            value=position["lag"],
        )


def _le(bound: float) -> str:
    return str(float(bound))


def create_blueprint(context: ApiContext) -> Blueprint:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PoolCollector(context))
    bp = Blueprint("metrics", __name__)

    @bp.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return bp
