"""The scheduler's signature that lets one worker contribute to one task: granted when the
task still collects contributions, the worker may work, there is time left, and the task
needs another replicate (a slot reserved atomically in the store)."""

from __future__ import annotations

import logging
import time

from poco.proofs import sign_authorization
from pool.messages import Authorization, AuthorizeRequest
from scheduler.context import CONTRIBUTING, SchedulerContext
from scheduler.fleet import Fleet

log = logging.getLogger(__name__)

# a worker asks for authorization before computing: keep at least this much time
MIN_TIME_LEFT_RATIO = 1.0  # x the category time reference


class Authorizer:
    def __init__(self, ctx: SchedulerContext, fleet: Fleet) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.fleet = fleet

    def authorize(self, request: AuthorizeRequest) -> Authorization:
        """Grant (worker, task, enclave) a signed authorization, or say why not.

        ``requeue`` in a refusal tells the worker to put the job back for another worker;
        otherwise the job is stale and is dropped.
        """
        taskid, worker, enclave = request.taskid, request.worker, request.enclave
        if request.expires_at is not None and time.time() > request.expires_at:
            # the worker stopped waiting: a grant now would reserve a slot nobody uses
            return _refuse("the request expired before it was read", requeue=False)
        task = self.store.task(taskid)
        if task is None:
            return _refuse("unknown task", requeue=False)
        if task["status"] not in {str(s) for s in CONTRIBUTING}:
            return _refuse(f"task is {task['status']}, not collecting contributions", False)
        allow = {a.lower() for a in self.ctx.settings.worker_allowlist}
        if allow and worker.lower() not in allow:
            return _refuse(f"worker {worker} is not in WORKERPOOL_WORKER_ALLOWLIST", True)
        paused = self.fleet.paused_until(worker)
        if paused is not None:
            return _refuse(
                f"worker {worker} is paused until {paused} after repeated failures", True
            )
        # asked for every job: a chain time up to 1 s old is exact enough for a margin of
        # MIN_TIME_LEFT_RATIO x timeref, and saves a block read per authorization
        now = self.ctx.client.block_timestamp(max_age=1.0)
        time_left = task["contributionDeadline"] - now
        if time_left < task["timeref"] * MIN_TIME_LEFT_RATIO:
            return _refuse(
                f"contribution deadline too close ({time_left}s left, the app may run "
                f"{task['timeref']}s)",
                False,
            )
        if self.store.replicate(taskid, worker) is not None:
            return _refuse(f"worker {worker} already has a replicate of this task", True)
        # reserve a slot atomically: never more replicates in flight than consensus needs
        if not self.store.reserve_replicate(taskid, task.get("replicatesNeeded", 1)):
            return _refuse("the task has all the replicates it needs", False)
        if not self.store.create_replicate(taskid, worker, {"enclave": enclave}):
            self.store.release_replicate(taskid)
            return _refuse(f"worker {worker} already has a replicate of this task", True)
        if task.get("waitingReason"):
            self.store.set_task_fields(taskid, {"waitingReason": ""})
        signature = sign_authorization(self.ctx.wallet.account.key, worker, taskid, enclave)
        log.info("authorized %s on task %s", worker, taskid)
        return Authorization(
            granted=True,
            signature=signature,
            enclave=enclave,
            workerpool=self.ctx.pool,
            # trust 1: the worker contributes, reveals and finalizes in one transaction
            fast_path=task.get("trust") == 1 and self.ctx.settings.contribute_and_finalize,
        )


def _refuse(reason: str, requeue: bool) -> Authorization:
    return Authorization(granted=False, reason=reason, requeue=requeue)
