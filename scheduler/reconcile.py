"""The slow path, every tick: the detectors (final and contribution deadlines, slow reveals
and uploads, steps a dead scheduler left half-done, lost workers), then each unfinished task
is moved on from what the store and the chain say. It repairs whatever a lost report or a
crash left behind; the chain is the truth."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

from poco.types import ChainTaskStatus
from pool.clock import utcnow
from pool.states import ReplicateStatus, TaskStatus
from scheduler.consensus import Consensus
from scheduler.context import CONTRIBUTING, IN_FLIGHT, REVEAL_PHASE, SchedulerContext, TickReport
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
# so that 10,000 tasks in flight cost no 10,000 eth_calls per tick (ops/bench scale)
CHAIN_RECHECK = 30.0
# compute logs past their retention are deleted this often (MongoDB's TTL index does it too;
# the embedded store has no TTL monitor)
LOGS_PURGE_PERIOD = 3600.0
INTERRUPTED_MARGIN = 10.0  # seconds beyond WORKERPOOL_TX_TIMEOUT: see recover_interrupted
# the projections of the passes that only need the task's id, and of the safety-net passes
# that ask the chain at most every CHAIN_RECHECK
_ID = ("chainTaskId",)
_CHECKED = ("chainTaskId", "chainCheckedAt")


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

    def reconcile(self, report: TickReport) -> None:
        """Every tick: the detectors, then each unfinished task is moved on from what the
        store and the chain say. Its store cost does not grow with the running tasks beyond
        what they need: tasks are read with projections, replicates with one query per
        :data:`pool.store.IN_BATCH` tasks, serving workers counted once per queue."""
        now = self.client.block_timestamp()
        self.finalizer.claim_expired(now, report)
        self.consensus.contribution_timeouts(now)
        self.consensus.reveal_timeouts(now)
        self.finalizer.upload_timeouts()
        self.recover_interrupted()
        self.fleet.detect_lost_workers()
        self.fleet.detect_stalled()
        self.purge_logs()
        self.reconcile_contributing()
        # winners whose contribution was never reported are found on chain: a safety net
        # behind the reports, so at most once per CHAIN_RECHECK per task
        for task in self.store.tasks_in(list(REVEAL_PHASE), fields=_CHECKED, ordered=False):
            if self._chain_check_due(task):
                self.consensus.request_reveals(task["chainTaskId"])
        for task in self.store.tasks_in([T.AT_LEAST_ONE_REVEALED], fields=_ID, ordered=False):
            self.finalizer.request_upload(task["chainTaskId"])
        for task in self.store.tasks_in(
            [T.RESULT_UPLOADED, T.FINALIZE_FAILED], fields=_ID, ordered=False
        ):
            self.finalizer.finalize(task["chainTaskId"])

    def purge_logs(self) -> None:
        """Delete the compute logs whose retention is over, once per LOGS_PURGE_PERIOD."""
        now = time.monotonic()
        if self._logs_purged_at is not None and now - self._logs_purged_at < LOGS_PURGE_PERIOD:
            return
        self._logs_purged_at = now
        purged = self.store.purge_compute_logs()
        if purged:
            log.info("deleted the compute logs of %d task(s): retention over", purged)

    def _chain_check_due(self, task: dict[str, Any]) -> bool:
        """Whether a tick's safety-net pass may ask the chain about ``task`` (a document with
        ``chainTaskId`` and ``chainCheckedAt``) now: once per :data:`CHAIN_RECHECK` seconds.
        When it may, the time is noted on the task."""
        now = utcnow()
        checked = task.get("chainCheckedAt")
        if checked is not None and (now - checked).total_seconds() < CHAIN_RECHECK:
            return False
        self.store.set_task_fields(task["chainTaskId"], {"chainCheckedAt": now})
        return True

    def recover_interrupted(self) -> None:
        """Steps a dead scheduler left half-done: the status claimed (FINALIZING, REOPENING)
        or set (FINALIZED), the transaction perhaps sent, the outcome never recorded. Once
        ``WORKERPOOL_TX_TIMEOUT`` + 10 s have passed no live scheduler can still be waiting
        for that transaction, so the chain decides where the task is."""
        cutoff = utcnow() - dt.timedelta(seconds=self.ctx.settings.tx_timeout + INTERRUPTED_MARGIN)
        why = "interrupted (scheduler restarted?)"
        for task in self.store.tasks_in(
            [T.FINALIZING, T.FINALIZED, T.REOPENING],
            fields=("chainTaskId", "status", "updatedAt"),
            ordered=False,
        ):
            updated = task.get("updatedAt")
            if updated is not None and updated > cutoff:
                continue
            taskid, status = task["chainTaskId"], task["status"]
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

    def reconcile_contributing(self) -> None:
        """Tasks collecting contributions: say why nobody took a task, check consensus when
        a contribution is in, re-plan when no replicate is under way."""
        tasks = self.store.tasks_in(
            CONTRIBUTING,
            fields=(
                "chainTaskId",
                "queue",
                "waitingReason",
                "chainCheckedAt",
                "tag",
                "enclaveChallenge",
            ),
            ordered=False,
        )
        replicates = self.store.replicates_of_tasks(
            [t["chainTaskId"] for t in tasks], fields=("status", "updatedAt")
        )
        serving: dict[str, int] = {}
        quiet_since = utcnow() - dt.timedelta(seconds=UNREPORTED_GRACE)
        for task in tasks:
            taskid = task["chainTaskId"]
            reps = replicates.get(taskid, [])
            statuses = {r["status"] for r in reps}
            unreported = any(
                r["status"] == str(R.WORKER_LOST)
                or (
                    r["status"] == str(R.CONTRIBUTING)
                    and r.get("updatedAt", quiet_since) <= quiet_since
                )
                for r in reps
            )
            if not statuses:
                self.fleet.explain_waiting(task, serving)
            elif str(R.CONTRIBUTED) in statuses:
                # no consensus yet: more replicates may be needed (their replicates failed)
                if self._chain_check_due(task) and not self.consensus.check(taskid):
                    self.planner.replan(taskid)
            elif unreported and self._chain_check_due(task) and self.consensus.check(taskid):
                pass  # a contribution whose report never came reached consensus on chain
            elif not statuses & IN_FLIGHT:
                # (replan returns at once while a replicate is under way: not even asked)
                self.planner.replan(taskid)
