"""The scheduler's signature that lets one worker contribute to one task: granted when the
task still collects contributions, the worker may work (a verified heartbeat says it
is alive and serves the task's queue, not paused, not holding more replicates than its
slots), there is time left, and the task needs another replicate (a slot reserved atomically
in the store). The request's signature and the allowlist were checked before
(:mod:`scheduler.inbox`): the worker here is the address that signed it."""

from __future__ import annotations

import logging
import time

from poco.orders import ZERO_ADDRESS
from poco.proofs import sign_authorization
from pool.messages import QUEUE_CAPABILITY, Authorization, AuthorizeRequest
from pool.states import ReplicateStatus, WorkerStatus
from scheduler.context import CONTRIBUTING, SchedulerContext
from scheduler.fleet import Fleet

log = logging.getLogger(__name__)

R = ReplicateStatus

# a worker asks for authorization before computing: keep at least this much time
MIN_TIME_LEFT_RATIO = 1.0  # x the category time reference
# replicates a worker holds before COMPUTED: at most this many times the slots of its last
# heartbeat (its reports may lag behind its next request), so that a node cannot reserve the
# replicates of many tasks and leave them waiting
HELD_PER_SLOT = 2
HOLDING = frozenset(str(s) for s in (R.CREATED, R.STARTING, R.APP_DOWNLOADING, R.COMPUTING))


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
        taskid, worker = request.taskid, request.worker
        if request.expires_at is not None and time.time() > request.expires_at:
            # the worker stopped waiting: a grant now would reserve a slot nobody uses
            return _refuse("the request expired before it was read", requeue=False)
        task = self.store.task(taskid)
        if task is None:
            return _refuse("unknown task", requeue=False)
        if task["status"] not in {str(s) for s in CONTRIBUTING}:
            return _refuse(f"task is {task['status']}, not collecting contributions", False)
        # the enclave signed in: a TEE task's challenge from its SMS, never one a worker
        # proposes; none for a standard task
        tee = self.ctx.tee.framework(task.get("tag")) is not None
        enclave = str(task.get("enclaveChallenge") or "") if tee else ZERO_ADDRESS
        if not enclave:
            return _refuse("the task has no enclave challenge from its SMS yet", True)
        record = self.store.worker(worker)
        if record is None or record.get("status") != str(WorkerStatus.ALIVE):
            return _refuse(f"worker {worker} has sent no heartbeat yet (or is LOST)", True)
        capability = QUEUE_CAPABILITY.get(task.get("queue", ""), "standard")
        if capability not in (record.get("capabilities") or []):
            return _refuse(f"worker {worker} does not serve {capability} (its heartbeat)", True)
        held = self.store.count_replicates_of_worker(worker, HOLDING)
        if held >= HELD_PER_SLOT * int(record.get("slots") or 0):
            return _refuse(
                f"worker {worker} holds {held} replicates not computed yet for "
                f"{record.get('slots')} slot(s)",
                True,
            )
        paused = self.fleet.paused_until(record)
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
            # trust 1: the worker contributes, reveals and finalizes in one transaction (a TEE
            # task always does, as iexec-core asks: its result is uploaded by its enclave)
            fast_path=task.get("trust") == 1 and (self.ctx.settings.contribute_and_finalize or tee),
        )


def _refuse(reason: str, requeue: bool) -> Authorization:
    return Authorization(granted=False, reason=reason, requeue=requeue)
