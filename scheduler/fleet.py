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
from pool.states import InvalidTransition, ReplicateStatus, WorkerStatus
from pool.states import ReplicateStatusCause as Cause
from scheduler.context import CONTRIBUTING, IN_FLIGHT, SchedulerContext
from scheduler.planning import Planner

log = logging.getLogger(__name__)

R = ReplicateStatus
# the progress bounds are looked at this often (a pass reads the replicates past the shortest)
STALL_CHECK = 30.0


def progress_bound(status: str, timeref: int, grace: float) -> float:
    """Seconds a replicate may stay in ``status`` (``timeref``: the task's category time
    reference; ``grace``: WORKERPOOL_PROGRESS_GRACE) before it counts as stalled:

    * CREATED: ``grace`` (the worker starts at once once authorized: a grant its worker no
      longer waited for holds a slot no longer);
    * STARTING, APP_DOWNLOADING: ``timeref + 3 x grace`` (pulling the image, then the
      downloads, which share the task's time with the app);
    * COMPUTING: ``timeref + grace`` (the node stops the app at ``timeref``);
    * COMPUTED, CONTRIBUTING, and a failure whose error result is being contributed:
      ``2 x grace`` (one transaction, retried).
    """
    if status == str(R.CREATED):
        return grace
    if status in (str(R.STARTING), str(R.APP_DOWNLOADING)):
        return timeref + 3 * grace
    if status == str(R.COMPUTING):
        return timeref + grace
    return 2 * grace


class Fleet:
    def __init__(self, ctx: SchedulerContext, planner: Planner) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.planner = planner
        self._stalls_checked: float | None = None

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
                    R.WORKER_LOST,
                    note="no heartbeat for WORKER_LOST_TIMEOUT",
                )
                self.planner.replan(rep["chainTaskId"])
        return lost

    def detect_stalled(self, force: bool = False) -> int:
        """Replicates of live workers that stayed in one status past its
        :func:`progress_bound` are WORKER_LOST: their node is told to abort them (except
        while contributing: the transaction may still be mined, the chain is asked) and the
        task is planned on another worker. Looked at once per :data:`STALL_CHECK` seconds
        (``force``: now). Returns how many were found."""
        now = time.monotonic()
        last = self._stalls_checked
        if not force and last is not None and now - last < STALL_CHECK:
            return 0
        self._stalls_checked = now
        grace = self.ctx.settings.progress_grace
        current = utcnow()
        candidates = self.store.replicates_updated_before(
            IN_FLIGHT,
            current - dt.timedelta(seconds=grace),
            fields=("chainTaskId", "worker", "status", "updatedAt"),
        )
        if not candidates:
            return 0
        ids = sorted({r["chainTaskId"] for r in candidates})
        timerefs = {
            t["chainTaskId"]: int(t.get("timeref") or 0)
            for t in self.store.tasks_in(
                CONTRIBUTING,
                fields=("chainTaskId", "timeref"),
                ordered=False,
                chainTaskId={"$in": ids},
            )
        }
        stalled = 0
        for rep in candidates:
            taskid, worker, status = rep["chainTaskId"], rep["worker"], rep["status"]
            if taskid not in timerefs:
                continue  # the task no longer collects contributions: its own passes decide
            bound = progress_bound(status, timerefs[taskid], grace)
            idle = (current - rep["updatedAt"]).total_seconds()
            if idle <= bound:
                continue
            why = f"no progress from {status} in {idle:.0f} s (bound {bound:.0f} s)"
            try:
                self.store.transition_replicate(taskid, worker, R.WORKER_LOST, note=why)
            except InvalidTransition:
                continue  # it moved meanwhile
            stalled += 1
            log.warning("replicate of %s on %s: %s", worker, taskid, why)
            if status != str(R.CONTRIBUTING):
                self.ctx.send_abort(worker, taskid, Cause.UNKNOWN, why)
            self.planner.replan(taskid, why=f"{worker}: {why}")
        return stalled

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
