"""The fleet as the scheduler sees it: heartbeats, lost and paused workers, and why a task
nobody took is waiting. Only a worker whose signed heartbeat verified is in it
(:mod:`scheduler.inbox` checks the signature, the time, the allowlist and the values)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from poco.tags import is_tee
from pool import keys
from pool.clock import utcnow
from pool.messages import QUEUE_CAPABILITY, Heartbeat, heartbeat_time
from pool.states import ReplicateStatus, WorkerStatus
from scheduler.context import IN_FLIGHT, SchedulerContext
from scheduler.planning import Planner

log = logging.getLogger(__name__)


class Fleet:
    def __init__(self, ctx: SchedulerContext, planner: Planner) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.planner = planner

    def heartbeat(self, beat: Heartbeat) -> None:
        fields = {
            "name": beat.name,
            "capabilities": list(beat.capabilities),
            "slots": beat.slots,
            "busySlots": beat.busy_slots,
            "version": beat.version,
            "cpus": beat.cpus,
            "memoryMb": beat.memory_mb,
            "refusing": beat.refusing or "",
        }
        previous = self.store.record_heartbeat(beat.worker, fields)
        if previous == WorkerStatus.LOST:
            log.info("worker %s is back", beat.worker)

    def succeeded(self, worker: str) -> None:
        self.store.worker_succeeded(worker)

    def failed(self, worker: str) -> None:
        """Count a failure of ``worker``; after WORKERPOOL_WORKER_MAX_FAILURES in a row it is
        paused (refused work) for WORKERPOOL_WORKER_PAUSE seconds."""
        settings = self.ctx.settings
        if self.store.worker_failed(worker) >= settings.worker_max_failures:
            until = utcnow() + dt.timedelta(seconds=settings.worker_pause)
            self.store.pause_worker(worker, until)
            log.warning(
                "worker %s paused until %s after %d failures",
                worker,
                until,
                settings.worker_max_failures,
            )

    def detect_lost_workers(self) -> int:
        """Workers silent for WORKER_LOST_TIMEOUT are LOST; their unfinished replicates are
        WORKER_LOST and planned on others."""
        timeout = self.ctx.settings.worker_lost_timeout
        cutoff = utcnow() - dt.timedelta(seconds=timeout)
        lost = 0
        for record in self.store.workers_with_status(WorkerStatus.ALIVE):
            if not self._silent(record, cutoff, timeout):
                continue
            if not self.store.mark_worker_lost(record["address"]):
                continue
            lost += 1
            log.warning(
                "worker %s is lost (last heartbeat %s)", record["address"], record["lastSeen"]
            )
            for rep in self.store.replicates_of_worker(record["address"], IN_FLIGHT):
                self.store.transition_replicate(
                    rep["chainTaskId"],
                    rep["worker"],
                    ReplicateStatus.WORKER_LOST,
                    note="no heartbeat for WORKER_LOST_TIMEOUT",
                )
                self.planner.replan(rep["chainTaskId"])
        return lost

    def _silent(self, record: dict[str, Any], cutoff: dt.datetime, timeout: float) -> bool:
        """Silent for longer than the timeout? Nodes write their last signed heartbeat
        straight into Redis, so that heartbeat messages waiting in a busy queue do not make
        a live node look silent; its signature is checked (a value anyone else wrote there
        says nothing) and the fresher of it and Mongo's ``lastSeen`` (set by the heartbeat
        messages) counts, so an old heartbeat put back there cannot make it look silent."""
        if not (record.get("lastSeen") and record["lastSeen"] < cutoff):
            return False
        if self.ctx.redis is not None:
            raw = self.ctx.redis.get(keys.node_seen(record["address"]))
            issued = (
                None if raw is None else heartbeat_time(raw, record["address"], self.ctx.domain)
            )
            if issued is not None:
                return time.time() - issued > timeout
        return True

    def paused_until(self, record: dict[str, Any]) -> dt.datetime | None:
        """When the pause of the worker (its document) ends, while it is paused."""
        paused = record.get("pausedUntil")
        return paused if paused is not None and paused > utcnow() else None

    def explain_waiting(self, task: dict[str, Any], serving: dict[str, int] | None = None) -> None:
        """A task nobody took: say so when no live worker serves its queue.

        ``serving`` caches the count of live workers per queue across the tasks of one
        pass (one count per queue, not one per waiting task)."""
        if task.get("tag") and not task.get("enclaveChallenge") and is_tee(task["tag"]):
            return  # a TEE task waiting for its enclave challenge: the planner says why
        queue = task["queue"]
        counts = {} if serving is None else serving
        if queue not in counts:
            counts[queue] = self.store.count_serving(QUEUE_CAPABILITY.get(queue, queue))
        reason = "" if counts[queue] else f"waiting: no live worker serves {queue}"
        if task.get("waitingReason", "") != reason:
            self.store.set_task_fields(task["chainTaskId"], {"waitingReason": reason})
