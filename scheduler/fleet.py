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
from pool.states import InvalidTransition, ReplicateStatus, TaskStatus, WorkerStatus
from pool.states import ReplicateStatusCause as Cause
from scheduler.context import CONTRIBUTING, IN_FLIGHT, SchedulerContext
from scheduler.planning import Planner, waiting_reason

log = logging.getLogger(__name__)

R = ReplicateStatus
# the progress bounds are looked at this often (a pass reads the replicates whose stall mark
# is due: those that changed since the last pass, and those past their bound)
STALL_CHECK = 30.0
# replicates a pass reads at once (it goes on, page after page, until none is due)
STALL_PAGE = 1000
_CONTRIBUTING = frozenset(str(s) for s in CONTRIBUTING)


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
        # queue -> whether a live worker served it at the last tick (see explain_waiting_queues)
        self._served: dict[str, bool] = {}
        self._stalls_checked: float | None = None
        self._stall_marks_checked = False  # replicates an earlier version left unmarked

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
                # it may have contributed before it went silent: the tick asks the chain
                self.store.mark_for_review(rep["chainTaskId"])
        return lost

    def detect_stalled(self, force: bool = False) -> int:
        """Replicates of live workers that stayed in one status past its
        :func:`progress_bound` are WORKER_LOST: their node is told to abort them (except
        while contributing: the transaction may still be mined, the chain is asked) and the
        task is planned on another worker. Looked at once per :data:`STALL_CHECK` seconds
        (``force``: now). Returns how many were found.

        A pass reads only the replicates whose stall mark (``stallAt``, indexed with the
        status) is due: every status change of a replicate sets it to the time of the change,
        and the pass that reads it moves it to when its bound runs out (from its last change
        and its task's time reference). So a replicate costs a look per status change and one
        when it stalls, not one per pass while it computes."""
        now = time.monotonic()
        last = self._stalls_checked
        if not force and last is not None and now - last < STALL_CHECK:
            return 0
        self._stalls_checked = now
        if not self._stall_marks_checked:  # once per process: no replicate left unmarked
            self.store.mark_unmarked_replicates(IN_FLIGHT)
            self._stall_marks_checked = True
        grace = self.ctx.settings.progress_grace
        current = utcnow()
        stalled = 0
        seen: set[tuple[str, str]] = set()
        while True:
            due = self.store.replicates_due(
                IN_FLIGHT,
                current,
                fields=("chainTaskId", "worker", "status", "updatedAt", "stallAt"),
                limit=STALL_PAGE,
            )
            keys = {(r["chainTaskId"], r["worker"]) for r in due}
            if keys <= seen:  # none left, or only those whose mark did not move (a race)
                return stalled
            seen |= keys
            tasks = {
                t["chainTaskId"]: t
                for t in self.store.tasks_by_id(
                    {r["chainTaskId"] for r in due}, fields=("status", "timeref")
                )
            }
            for rep in due:
                stalled += self._look_stalled(rep, tasks.get(rep["chainTaskId"]), grace, current)
            if len(due) < STALL_PAGE:
                return stalled

    def _look_stalled(
        self, rep: dict[str, Any], task: dict[str, Any] | None, grace: float, current: dt.datetime
    ) -> int:
        """One replicate whose stall mark is due: WORKER_LOST when past its bound (1), else
        its mark moved to when the bound runs out (0)."""
        taskid, worker, status = rep["chainTaskId"], rep["worker"], rep["status"]
        bound = progress_bound(status, int((task or {}).get("timeref") or 0), grace)
        since = rep.get("updatedAt") or rep["stallAt"]
        ends = since + dt.timedelta(seconds=bound)
        if task is None or task.get("status") not in _CONTRIBUTING:
            # the task no longer collects contributions: its own passes decide (looked at
            # again one bound from now, should it collect them again)
            self.store.move_stall_mark(
                taskid, worker, rep["stallAt"], current + dt.timedelta(seconds=bound)
            )
            return 0
        if ends > current:
            self.store.move_stall_mark(taskid, worker, rep["stallAt"], ends)
            return 0
        idle = (current - since).total_seconds()
        why = f"no progress from {status} in {idle:.0f} s (bound {bound:.0f} s)"
        try:
            self.store.transition_replicate(taskid, worker, R.WORKER_LOST, note=why)
        except InvalidTransition:
            return 0  # it moved meanwhile (which marked it again)
        log.warning("replicate of %s on %s: %s", worker, taskid, why)
        if status != str(R.CONTRIBUTING):
            self.ctx.send_abort(worker, taskid, Cause.UNKNOWN, why)
        # the tick looks at the task (contributing, it may have been mined: the chain is
        # asked), also if planning it again fails now
        self.store.mark_for_review(taskid)
        self.planner.replan(taskid, why=f"{worker}: {why}")
        return 1

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

    def explain_waiting_queues(self) -> None:
        """When a queue gains its first live worker or loses its last one, every task of it
        that nobody took says so (one update per queue that changed, none while the fleet
        stays as it was; every queue at the first tick of a process)."""
        served = self.store.served_capabilities()
        for queue, capability in QUEUE_CAPABILITY.items():
            now_served = capability in served
            if self._served.get(queue) == now_served:
                continue
            # (an INITIALIZED task is not planned yet: the planner says why it waits, e.g. a
            # TEE task for its enclave challenge, and why once it is planned)
            changed = self.store.explain_waiting(
                queue, (TaskStatus.RUNNING, TaskStatus.REOPENED), waiting_reason(queue, now_served)
            )
            self._served[queue] = now_served
            if changed:
                log.info(
                    "%d task(s) of %s: %s",
                    changed,
                    queue,
                    waiting_reason(queue, now_served) or "a live worker serves it",
                )

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
        reason = waiting_reason(queue, bool(counts[queue]))
        if task.get("waitingReason", "") != reason:
            self.store.set_task_fields(task["chainTaskId"], {"waitingReason": reason})
