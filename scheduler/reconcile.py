"""The slow path, every tick: what is due, then what the reports marked, then a slice of the
safety net. It repairs whatever a lost report or a crash left behind; the chain is the truth.

Its cost follows what changed, not what exists (ops/bench scale):

* **due times**: each detector is a range query on one indexed time within the statuses it
  serves (``Store.tasks_due``): final and contribution deadlines, reveal deadlines, the times
  a reveal, an upload or a finalize is asked again, steps a dead scheduler left half-done;
* **marks**: a report or an event that needs a look (a replicate failed, a worker was lost, a
  contribution under way, a winner revealed late) sets the task's ``reviewAt``; the next tick
  looks at the marked tasks, oldest mark first;
* **the progress bounds** (``Fleet.detect_stalled``, every ``STALL_CHECK``): a range on the
  replicates' stall mark, set by each status change and moved by the look to when the
  replicate's bound runs out;
* **the safety net**: behind the reports, each tick looks at a bounded slice of the tasks in
  flight, the next ones by task id: a round robin over all of them, so every task is still
  looked at, and a round starts at most once per :data:`CHAIN_RECHECK`.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from poco.errors import PocoError
from poco.types import ChainTaskStatus
from pool.clock import utcnow
from pool.states import ReplicateStatus, TaskStatus
from scheduler.consensus import Consensus
from scheduler.context import (
    CONTRIBUTING,
    IN_FLIGHT,
    INTERRUPTIBLE,
    REVEAL_PHASE,
    SchedulerContext,
    TickReport,
)
from scheduler.finalize import Finalizer
from scheduler.fleet import Fleet
from scheduler.planning import Planner

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

# a replicate WORKER_LOST, or CONTRIBUTING for this many seconds, may have contributed (or
# contributed and finalized) without its report reaching us: the chain is asked. Not sooner:
# the report of a live worker carries the transaction hash.
UNREPORTED_GRACE = 15.0
# the tick's own look at the chain for a task (consensus reached, an unreported contribution)
# is a safety net behind the reports: once per task per this many seconds, not every tick,
# so that 10,000 tasks in flight cost no 10,000 eth_calls per tick (ops/bench scale). The
# safety net looks at a task again no sooner than this either.
CHAIN_RECHECK = 30.0
# tasks the safety net looks at per tick: at 100,000 tasks in flight and a tick every 2 s,
# each one is looked at about every half hour (docs/performance.md); at 3,000 every 30 s
REVIEW_SLICE = 100
# marked tasks looked at per tick, oldest mark first (the rest wait for the next tick)
MARKED_PER_TICK = 1000
# compute logs past their retention are deleted this often (MongoDB's TTL index does it too;
# the embedded store has no TTL monitor)
LOGS_PURGE_PERIOD = 3600.0
# the statuses the marks and the safety net serve (the others have due times of their own)
REVIEWED = (*CONTRIBUTING, *REVEAL_PHASE, *INTERRUPTIBLE)
_CONTRIBUTING = frozenset(str(s) for s in CONTRIBUTING)
_REVEAL_PHASE = frozenset(str(s) for s in REVEAL_PHASE)
_INTERRUPTIBLE = frozenset(str(s) for s in INTERRUPTIBLE)
# what a look at a task reads of it
_LOOK = (
    "status",
    "queue",
    "waitingReason",
    "chainCheckedAt",
    "updatedAt",
    "tag",
    "enclaveChallenge",
)


class Reconciler:
    def __init__(
        self,
        ctx: SchedulerContext,
        planner: Planner,
        fleet: Fleet,
        consensus: Consensus,
        finalizer: Finalizer,
    ) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.planner = planner
        self.fleet = fleet
        self.consensus = consensus
        self.finalizer = finalizer
        self._logs_purged_at: float | None = None
        self._upgraded = False
        # the safety net's round: when it started, the last task id looked at ("": none
        # yet), whether it reached the last task (kept by this process; a restart starts over)
        self._round_started: dt.datetime | None = None
        self._round_after = ""
        self._round_done = False

    def reconcile(self, report: TickReport) -> None:
        """Every tick: what is due (deadlines, retries, interrupted steps, lost workers),
        the tasks the reports marked, then a slice of the safety net. Tasks are read with
        projections and only those due, marked or in the slice."""
        if not self._upgraded:
            self.upgrade()
        now = self.client.block_timestamp()
        self.finalizer.claim_expired(now, report)
        self.consensus.contribution_timeouts(now)
        self.consensus.reveal_timeouts(now)
        self.finalizer.upload_timeouts()
        self.finalizer.retry_uploads()
        self.finalizer.retry_finalize(now)
        self.fleet.detect_lost_workers()
        self.fleet.detect_stalled()
        self.fleet.explain_waiting_queues()
        self.purge_logs()
        self.review_marked(report)
        self.review_slice(report)

    def upgrade(self) -> None:
        """Once per process, before its first tick: what an earlier version stored without
        the time the tick now finds it by gets it. A consensus: the time its winners were
        asked (its last change); a step that may have been interrupted: a mark (looked at
        now, then once no live scheduler can still be at it)."""
        for task in self.store.tasks_due(INTERRUPTIBLE, "reviewAt", None, fields=()):
            self.store.mark_for_review(task["chainTaskId"])
        for task in self.store.tasks_due(
            [T.CONSENSUS_REACHED], "revealAskedAt", None, fields=("updatedAt",)
        ):
            asked = task.get("updatedAt") or utcnow()
            self.store.set_task_fields(task["chainTaskId"], {"revealAskedAt": asked})
        self._upgraded = True

    def purge_logs(self) -> None:
        """Delete the compute logs whose retention is over, once per LOGS_PURGE_PERIOD."""
        now = time.monotonic()
        if self._logs_purged_at is not None and now - self._logs_purged_at < LOGS_PURGE_PERIOD:
            return
        self._logs_purged_at = now
        purged = self.store.purge_compute_logs()
        if purged:
            log.info("deleted the compute logs of %d task(s): retention over", purged)

    # ---- marks and the safety net --------------------------------------------------------
    def review_marked(self, report: TickReport) -> None:
        """The tasks a report, an event or a claimed step marked, oldest mark first (at most
        :data:`MARKED_PER_TICK`): each is looked at, and its mark cleared, or moved to when it
        needs its next look (a contribution under way within its grace: the next tick; a step
        that may have been interrupted: once no live scheduler can still be at it)."""
        marked = self.store.tasks_due(
            REVIEWED, "reviewAt", utcnow(), fields=_LOOK, limit=MARKED_PER_TICK
        )
        if not marked:
            return
        again = self._look(marked, report)
        for task in marked:
            taskid = task["chainTaskId"]
            self.store.move_review_mark(taskid, task["reviewAt"], again.get(taskid))

    def review_slice(self, report: TickReport) -> None:
        """The safety net: the next :data:`REVIEW_SLICE` tasks in flight by task id. A round
        over all of them ends when a slice comes back short; the next one starts once
        :data:`CHAIN_RECHECK` has passed since this one started, so a task is looked at once
        per round, at most once per CHAIN_RECHECK and at least once per N / slice ticks."""
        now = utcnow()
        started = self._round_started
        if started is None or (
            self._round_done and (now - started).total_seconds() >= CHAIN_RECHECK
        ):
            self._round_started, self._round_after, self._round_done = now, "", False
        if self._round_done:
            return
        picked = self.store.tasks_after(
            REVIEWED, self._round_after, fields=_LOOK, limit=REVIEW_SLICE
        )
        if len(picked) < REVIEW_SLICE:
            self._round_done = True
        else:
            self._round_after = picked[-1]["chainTaskId"]
        if picked:
            self._look(picked, report)

    def _look(self, tasks: list[dict[str, Any]], report: TickReport) -> dict[str, dt.datetime]:
        """Move each task on from what the store and the chain say; when to look again at
        those that need it before the safety net comes back. A task whose look fails on the
        chain is logged, looked at again at the next tick, and the others are looked at."""
        contributing = [t["chainTaskId"] for t in tasks if t["status"] in _CONTRIBUTING]
        replicates = self.store.replicates_of_tasks(contributing, fields=("status", "updatedAt"))
        serving: dict[str, int] = {}
        now = utcnow()
        quiet_since = now - dt.timedelta(seconds=UNREPORTED_GRACE)
        again: dict[str, dt.datetime] = {}
        for task in tasks:
            taskid, status = task["chainTaskId"], task["status"]
            try:
                if status in _CONTRIBUTING:
                    reps = replicates.get(taskid, [])
                    if self._look_contributing(task, reps, serving, quiet_since):
                        again[taskid] = now
                elif status in _REVEAL_PHASE:
                    self._look_revealing(task)
                elif status in _INTERRUPTIBLE:
                    due = self.ctx.interrupted_after(task.get("updatedAt") or now)
                    if due <= now:
                        self._recover(taskid, status)
                    else:  # the step may still be under way in a live scheduler
                        again[taskid] = due
            except PocoError as exc:
                log.warning("task %s: %s (looked at again later)", taskid, exc)
                report.errors.append(f"task {taskid}: {exc}")
                again[taskid] = now
        return again

    def _look_contributing(
        self,
        task: dict[str, Any],
        reps: list[dict[str, Any]],
        serving: dict[str, int],
        quiet_since: dt.datetime,
    ) -> bool:
        """A task collecting contributions: say why nobody took it, check consensus when a
        contribution is in, re-plan when no replicate is under way. True while a replicate
        is CONTRIBUTING within its grace (its report may still come: look again)."""
        taskid = task["chainTaskId"]
        statuses = {r["status"] for r in reps}
        contributing = [r for r in reps if r["status"] == str(R.CONTRIBUTING)]
        unreported = str(R.WORKER_LOST) in statuses or any(
            r.get("updatedAt", quiet_since) <= quiet_since for r in contributing
        )
        if not statuses:
            self.fleet.explain_waiting(task, serving)
        elif str(R.CONTRIBUTED) in statuses:
            # no consensus yet: more replicates may be needed (their replicates failed)
            if self._chain_check_due(task) and not self.consensus.check(taskid):
                self.planner.replan(taskid)
        elif unreported and self._chain_check_due(task) and self.consensus.check(taskid):
            return False  # a contribution whose report never came reached consensus on chain
        elif not statuses & IN_FLIGHT:
            # (replan returns at once while a replicate is under way: not even asked)
            self.planner.replan(taskid)
        return any(r.get("updatedAt", quiet_since) > quiet_since for r in contributing)

    def _look_revealing(self, task: dict[str, Any]) -> None:
        """Past consensus: winners whose contribution was never reported are found on chain
        (at most once per CHAIN_RECHECK), the upload asked, the result finalized."""
        taskid, status = task["chainTaskId"], task["status"]
        if self._chain_check_due(task):
            self.consensus.request_reveals(taskid)
        if status == str(T.AT_LEAST_ONE_REVEALED):
            self.finalizer.request_upload(taskid)
        elif status == str(T.RESULT_UPLOADED):
            self.finalizer.finalize(taskid)

    def _chain_check_due(self, task: dict[str, Any]) -> bool:
        """Whether a tick may ask the chain about ``task`` (a document with ``chainTaskId``
        and ``chainCheckedAt``) now: once per :data:`CHAIN_RECHECK` seconds. When it may,
        the time is noted on the task."""
        now = utcnow()
        checked = task.get("chainCheckedAt")
        if checked is not None and (now - checked).total_seconds() < CHAIN_RECHECK:
            return False
        self.store.set_task_fields(task["chainTaskId"], {"chainCheckedAt": now})
        return True

    # ---- steps left half-done ------------------------------------------------------------
    def _recover(self, taskid: str, status: str) -> None:
        """A step a dead scheduler left half-done: the status claimed (FINALIZING,
        REOPENING) or set (FINALIZED), the transaction perhaps sent, the outcome never
        recorded. Once ``WORKERPOOL_TX_TIMEOUT`` + 10 s have passed no live scheduler can
        still be waiting for that transaction, so the chain decides where the task is."""
        why = "interrupted (scheduler restarted?)"
        chain = self.client.view_task(taskid)
        if status in (str(T.FINALIZING), str(T.FINALIZED)):
            if chain.status == ChainTaskStatus.COMPLETED:
                self.finalizer.complete(taskid, note=f"finalize {why}: completed on chain")
            elif status == str(T.FINALIZING):
                log.warning("task %s: finalize %s: trying again", taskid, why)
                self.store.claim_task(
                    taskid,
                    [T.FINALIZING],
                    T.FINALIZE_FAILED,
                    note=f"finalize {why}: not completed on chain, trying again",
                    extra={"finalizeRetryAt": utcnow()},
                )
        elif chain.status == ChainTaskStatus.ACTIVE:  # REOPENING, and the reopen was mined
            self.consensus.abort_silent_winners(taskid)
            self.store.claim_task(
                taskid, [T.REOPENING], T.REOPENED, note=f"reopen {why}: reopened on chain"
            )
            self.planner.replan(taskid)
        elif chain.status == ChainTaskStatus.REVEALING:
            self.store.claim_task(
                taskid, [T.REOPENING], T.CONSENSUS_REACHED, note=f"reopen {why}: not mined"
            )
