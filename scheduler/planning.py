"""Replicate jobs: plan a task's first replicates, queue them, plan more when the ones
granted cannot reach consensus, and rebuild jobs that Redis lost."""

from __future__ import annotations

import logging
import time
from typing import Any

from poco.consensus import more_replicates_needed, simulate
from poco.types import ChainTaskStatus, ContributionStatus
from pool.messages import QUEUE_CAPABILITY, REPLICATE_QUEUES, ReplicateJob
from pool.redact import redact_urls
from pool.states import ReplicateStatus, TaskStatus
from scheduler.context import CONTRIBUTING, IN_FLIGHT, SchedulerContext, TickReport

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

# a request the pool refuses (START_FAILED): any other worker would refuse it the same way
REFUSED = str(R.START_FAILED)


# tasks read at once by the planning step (a page: its memory does not grow with the backlog)
PLAN_PAGE = 1000
# tasks the lost-jobs pass looks at per queue and tick, oldest enqueued first
REQUEUE_PER_TICK = 1000
_PLANNED = (
    "chainTaskId",
    "queue",
    "contributionDeadline",
    "replicatesNeeded",
    "tag",
    "enclaveChallenge",
    "waitingReason",
)


def waiting_reason(queue: str, served: bool) -> str:
    """What a task nobody took says: nothing while a live worker serves its queue."""
    return "" if served else f"waiting: no live worker serves {queue}"


class Planner:
    def __init__(self, ctx: SchedulerContext) -> None:
        self.ctx = ctx
        self.store = ctx.store

    def plan(self, report: TickReport) -> None:
        """The tick's step: enqueue the replicate jobs each initialized task needs (a TEE
        task once the SMS gave its enclave challenge), a page of tasks at a time, each page
        recorded in the store with one update per queue and number of replicates before its
        jobs are sent (a crash after this loses queued jobs, which :meth:`requeue_lost_jobs`
        rebuilds from the store, but never enqueues twice)."""
        served: set[str] | None = None
        waiting: set[str] = set()  # TEE tasks without a challenge yet: left for a later tick
        while True:
            page = self.store.tasks_page(
                T.INITIALIZED, PLAN_PAGE, fields=_PLANNED, skip_tasks=waiting
            )
            if not page:
                return
            ready: list[dict[str, Any]] = []
            for task in page:
                if self._enclave_ready(task):
                    ready.append(task)
                else:
                    waiting.add(task["chainTaskId"])
            if not ready:
                continue  # the next page leaves these out
            if served is None:  # why a task waits, from the start (the fleet pass follows)
                served = self.store.served_capabilities()
            groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for task in ready:
                groups.setdefault((task["queue"], task["replicatesNeeded"]), []).append(task)
            moved = 0
            for (queue, needed), tasks in groups.items():
                moved += self._start(queue, needed, tasks, served, report)
            if not moved:
                return  # another scheduler moved them: nothing of this page is ours

    def _enclave_ready(self, task: dict[str, Any]) -> bool:
        """A standard task, or a TEE task whose enclave challenge is stored (asked from its
        SMS now if need be). A TEE task whose SMS does not answer waits, with the reason,
        and is asked again next tick."""
        tee = self.ctx.tee
        framework = tee.framework(task.get("tag"))
        if framework is None or task.get("enclaveChallenge"):
            return True
        taskid = task["chainTaskId"]
        url = tee.sms_url(framework)
        challenge, why = tee.challenge(taskid, url) if url else ("", "no SMS for " + framework)
        if not challenge:
            reason = redact_urls(f"waiting: no enclave challenge from the SMS yet ({why})")
            if task.get("waitingReason") != reason:
                self.store.set_task_fields(taskid, {"waitingReason": reason})
            return False
        self.store.set_task_fields(taskid, {"enclaveChallenge": challenge, "waitingReason": ""})
        log.info(
            "task %s: enclave challenge %s from the SMS %s", taskid, challenge, redact_urls(url)
        )
        return True

    def _start(
        self,
        queue: str,
        needed: int,
        tasks: list[dict[str, Any]],
        served: set[str],
        report: TickReport,
    ) -> int:
        """INITIALIZED -> RUNNING with ``needed`` jobs each, then the jobs are sent."""
        stamp = time.time()  # also tells which tasks this update moved
        ids = [t["chainTaskId"] for t in tasks]
        moved = self.store.transition_tasks(
            ids,
            T.RUNNING,
            inc={"jobsQueued": needed},
            extra={
                "enqueuedAt": stamp,
                "waitingReason": waiting_reason(queue, QUEUE_CAPABILITY.get(queue) in served),
            },
        )
        if moved < len(ids):  # some were moved by someone else: send only for ours
            mine = self.store.tasks_by_id(ids, fields=("status", "enqueuedAt"))
            ours = {t["chainTaskId"] for t in mine if t.get("enqueuedAt") == stamp}
            tasks = [t for t in tasks if t["chainTaskId"] in ours]
        for task in tasks:
            for _ in range(needed):
                self._send(task)
                report.jobs_enqueued += 1
        return moved

    def _send(self, task: dict[str, Any]) -> None:
        self.ctx.messages.run_replicate(
            ReplicateJob(task["chainTaskId"], task["contributionDeadline"]), task["queue"]
        )

    def enqueue(self, task: dict[str, Any]) -> None:
        self._send(task)
        self.store.set_task_fields(task["chainTaskId"], {"enqueuedAt": time.time()})

    def requeue_lost_jobs(self, report: TickReport) -> int:
        """Rebuild replicate jobs that Redis lost (a restart without persistence): a task
        still owed jobs (needed > granted) whose queue has been empty for a while gets them
        again. A duplicate is harmless: the authorization refuses what a task does not need.

        Only the tasks of an empty queue enqueued before the grace are read, oldest first and
        at most :data:`REQUEUE_PER_TICK` per queue; one owed nothing any more leaves this
        pass (until it is enqueued again), so a queue emptied by busy workers costs each of
        its tasks one look, not one per tick."""
        redis = self.ctx.redis
        if redis is None:
            return 0
        grace = max(30.0, 10 * self.ctx.settings.poll_period)
        now = time.time()
        added = 0
        for queue in REPLICATE_QUEUES.values():
            if int(redis.llen(queue)) != 0:
                continue
            for task in self.store.owed_jobs(
                queue, [T.RUNNING, T.REOPENED], now - grace, REQUEUE_PER_TICK
            ):
                owed = task.get("replicatesNeeded", 0) - task.get("replicatesGranted", 0)
                if owed <= 0:
                    self.store.unset_enqueued(task["chainTaskId"], task["enqueuedAt"])
                    continue
                log.warning(
                    "task %s: %d job(s) missing from %s; queued again",
                    task["chainTaskId"],
                    owed,
                    queue,
                )
                for _ in range(owed):
                    self.enqueue(task)
                added += owed
        report.jobs_enqueued += added
        return added

    def replan(self, taskid: str, why: str = "") -> int:
        """Plan more replicates when the ones granted cannot reach consensus: contributions
        that disagree, or replicates lost with their worker, stalled, or failed on their
        node's side (``why``, recorded in the task's timeline). A failure of the app or of
        the requester's inputs ends in an error result, which counts as a contribution like
        any other; a request the pool refuses (START_FAILED) is not planned again. Bounded
        BOINC-style by WORKERPOOL_MAX_REPLICATES and WORKERPOOL_MAX_ERRONEOUS (the reason
        planning stopped is kept on the task). Returns the jobs added."""
        task = self.store.task(taskid)
        if task is None or task["status"] not in {str(s) for s in CONTRIBUTING}:
            return 0
        reps = self.store.replicates_of(taskid)
        if any(r["status"] in IN_FLIGHT for r in reps):
            return 0  # wait for the replicates under way
        if any(r["status"] == REFUSED for r in reps):
            return 0  # refused by the pool's rules: running it elsewhere proves nothing
        if task.get("replicatesNeeded", 0) > task.get("replicatesGranted", 0):
            return 0  # jobs are still waiting in the queue for a worker
        client = self.ctx.client
        chain = client.view_task(taskid)
        if chain.status != ChainTaskStatus.ACTIVE:
            return 0
        contributions = []
        for worker in chain.contributors:
            c = client.view_contribution(taskid, worker)
            if c.status != ContributionStatus.REJECTED:  # rejected by a reopen: out of the count
                contributions.append((c.result_hash, 2**c.weight))
        more = more_replicates_needed(contributions, task["trust"])
        if more == 0:
            return 0
        groups, _ = simulate(contributions)
        erroneous = len(contributions) - max(
            (sum(1 for h, _ in contributions if h == best) for best in groups), default=0
        )
        settings = self.ctx.settings
        limit = ""
        if len(reps) + more > settings.max_replicates:
            limit = f"{len(reps) + more} replicates would exceed WORKERPOOL_MAX_REPLICATES"
        elif erroneous > settings.max_erroneous:
            limit = f"{erroneous} disagreeing contributions exceed WORKERPOOL_MAX_ERRONEOUS"
        if limit:
            if task.get("planningStopped") != limit:
                self.store.set_task_fields(taskid, {"planningStopped": limit})
                log.error("task %s: no more replicates: %s", taskid, limit)
            return 0
        doc = self.store.plan_more_replicates(
            taskid,
            task["replicatesNeeded"],
            more,
            task["status"],
            f"planned {more} more replicate(s)" + (f": {why}" if why else ""),
        )
        if doc is None:
            return 0  # another thread re-planned first
        for _ in range(more):
            self.enqueue(doc)
        log.info(
            "task %s: planned %d more replicate(s) (%d contributions so far)",
            taskid,
            more,
            len(contributions),
        )
        return more
