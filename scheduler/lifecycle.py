"""The scheduler's second half: authorize workers, follow their reports, reach consensus,
ask for reveals and the upload, finalize; claim what passed its final deadline.

Reports from workers drive the fast path (a CONTRIBUTED report checks consensus at once, a
RESULT_UPLOADED report finalizes at once); the tick's :meth:`Lifecycle.reconcile` is the slow
path that repairs anything a lost message or a crash left behind, reading the chain as truth.
Every step that sends a transaction first wins a strict compare-and-set on the task's status,
so concurrent threads or schedulers never send it twice.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from poco import actions
from poco.errors import PocoError, TransactionReverted
from poco.orders import ZERO_ADDRESS
from poco.proofs import sign_authorization
from poco.types import ChainTaskStatus
from pool.celery_app import REVEAL_TASK, UPLOAD_TASK, worker_queue
from pool.states import FINAL_TASK_STATUSES, ReplicateStatus, TaskStatus
from pool.store import utcnow

if TYPE_CHECKING:
    from scheduler.service import Scheduler, TickReport

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

# task statuses in which contributions are still being collected
CONTRIBUTING = (T.INITIALIZED, T.RUNNING, T.REOPENED)
# replicate statuses that will never contribute
DEAD_REPLICATES = {
    str(s)
    for s in (
        R.APP_DOWNLOAD_FAILED,
        R.DATA_DOWNLOAD_FAILED,
        R.COMPUTE_FAILED,
        R.CONTRIBUTE_FAILED,
        R.WORKER_LOST,
        R.ABORTED,
    )
}
# a worker asks for authorization before computing: keep at least this much time
MIN_TIME_LEFT_RATIO = 1.0  # x the category time reference


class Lifecycle:
    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        self.store = scheduler.store
        self.client = scheduler.client
        self.wallet = scheduler.wallet

    # ---- authorization (worker -> scheduler, synchronous) ---------------------------------
    def authorize(self, taskid: str, worker: str, enclave: str = ZERO_ADDRESS) -> dict[str, Any]:
        """Grant (worker, task, enclave) a signed authorization, or say why not.

        ``requeue`` in a refusal tells the worker to put the job back for another worker;
        otherwise the job is stale and is dropped.
        """
        task = self.store.task(taskid)
        if task is None:
            return _refuse("unknown task", requeue=False)
        if task["status"] not in {str(s) for s in CONTRIBUTING}:
            return _refuse(f"task is {task['status']}, not collecting contributions", False)
        allow = {a.lower() for a in self.s.settings.worker_allowlist}
        if allow and worker.lower() not in allow:
            return _refuse(f"worker {worker} is not in WORKERPOOL_WORKER_ALLOWLIST", True)
        now = self.client.block_timestamp()
        time_left = task["contributionDeadline"] - now
        if time_left < task["timeref"] * MIN_TIME_LEFT_RATIO:
            return _refuse(
                f"contribution deadline too close ({time_left}s left, the app may run "
                f"{task['timeref']}s)",
                False,
            )
        if self.store.replicate(taskid, worker) is not None:
            return _refuse(f"worker {worker} already has a replicate of this task", True)
        needed = task.get("replicatesNeeded", 1)
        # reserve a slot atomically: never more replicates in flight than consensus needs
        reserved = self.store.tasks.find_one_and_update(
            {
                "chainTaskId": taskid,
                "replicatesNeeded": needed,
                "replicatesGranted": {"$lt": needed},
            },
            {"$inc": {"replicatesGranted": 1}},
        )
        if reserved is None:
            return _refuse("the task has all the replicates it needs", False)
        if not self.store.create_replicate(taskid, worker, {"enclave": enclave}):
            self.store.tasks.update_one(
                {"chainTaskId": taskid}, {"$inc": {"replicatesGranted": -1}}
            )
            return _refuse(f"worker {worker} already has a replicate of this task", True)
        signature = sign_authorization(self.s.wallet.account.key, worker, taskid, enclave)
        log.info("authorized %s on task %s", worker, taskid)
        return {
            "granted": True,
            "signature": signature,
            "enclave": enclave,
            "workerpool": self.s.pool,
        }

    # ---- worker reports ----------------------------------------------------------------------
    def on_report(
        self, taskid: str, worker: str, status: str, details: dict[str, Any] | None = None
    ) -> None:
        details = details or {}
        target = ReplicateStatus(status)
        extra = {k: v for k, v in details.items() if k in _REPORT_FIELDS}
        doc = self.store.advance_replicate(
            taskid,
            worker,
            target,
            tx_hash=details.get("txHash"),
            note=details.get("reason"),
            extra=extra,
        )
        if doc is None:
            log.info("stale or unknown report %s from %s on %s", status, worker, taskid)
            return
        if target == R.CONTRIBUTED:
            self.check_consensus(taskid)
        elif target == R.REVEALED:
            self.after_reveal(taskid)
        elif target == R.RESULT_UPLOADED:
            self.after_upload(taskid, details)
        elif target == R.RESULT_UPLOADING:
            pass
        elif str(target) in DEAD_REPLICATES:
            log.warning(
                "replicate of %s on %s: %s (%s)", worker, taskid, status, details.get("reason", "")
            )

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        fields = {k: v for k, v in info.items() if k in _HEARTBEAT_FIELDS}
        self.store.workers.update_one(
            {"address": worker.lower()},
            {
                "$set": {**fields, "lastSeen": utcnow(), "status": "ALIVE"},
                "$setOnInsert": {"registeredAt": utcnow()},
            },
            upsert=True,
        )

    # ---- consensus, reveal, upload, finalize ---------------------------------------------
    def check_consensus(self, taskid: str) -> bool:
        chain = self.client.view_task(taskid)
        if chain.status != ChainTaskStatus.REVEALING:
            return False
        task = self.store.claim_task(
            taskid,
            CONTRIBUTING,
            T.CONSENSUS_REACHED,
            extra={
                "consensusValue": chain.consensus_value,
                "revealDeadline": chain.reveal_deadline,
                "winnerCounter": chain.winner_counter,
            },
        )
        if task is None:
            return False
        for rep in self.store.replicates_of(taskid):
            if rep["status"] != str(R.CONTRIBUTED):
                continue
            contribution = self.client.view_contribution(taskid, rep["worker"])
            if contribution.result_hash == chain.consensus_value:
                self._send(REVEAL_TASK, rep["worker"], taskid)
        log.info("task %s reached consensus", taskid)
        return True

    def after_reveal(self, taskid: str) -> None:
        self.store.claim_task(taskid, [T.CONSENSUS_REACHED], T.AT_LEAST_ONE_REVEALED)
        self.request_upload(taskid)

    def request_upload(self, taskid: str, exclude: set[str] | None = None) -> bool:
        revealed = [
            r["worker"]
            for r in self.store.replicates_of(taskid)
            if r["status"] == str(R.REVEALED) and r["worker"] not in (exclude or set())
        ]
        if not revealed:
            return False
        task = self.store.claim_task(
            taskid,
            [T.AT_LEAST_ONE_REVEALED],
            T.RESULT_UPLOADING,
            extra={"uploader": revealed[0], "uploadRequestedAt": utcnow()},
        )
        if task is None:
            return False
        self._send(UPLOAD_TASK, revealed[0], taskid)
        return True

    def after_upload(self, taskid: str, details: dict[str, Any]) -> None:
        link = details.get("resultLink")
        if not link:
            log.error("RESULT_UPLOADED for %s without a result link", taskid)
            return
        self.store.claim_task(
            taskid,
            [T.RESULT_UPLOADING, T.AT_LEAST_ONE_REVEALED],
            T.RESULT_UPLOADED,
            extra={"resultLink": link, "callbackData": details.get("callbackData", "")},
        )
        self.finalize(taskid)

    def finalize(self, taskid: str) -> bool:
        task = self.store.task(taskid)
        if task is None or task["status"] not in (str(T.RESULT_UPLOADED), str(T.FINALIZE_FAILED)):
            return False
        chain = self.client.view_task(taskid)
        now = self.client.block_timestamp()
        if chain.status == ChainTaskStatus.COMPLETED:
            self._complete(taskid, note="found completed on chain")
            return True
        if not (
            chain.reveal_counter == chain.winner_counter
            or (chain.reveal_counter > 0 and chain.reveal_deadline <= now)
        ):
            return False  # wait for the other winners or the reveal deadline (next tick)
        claimed = self.store.claim_task(
            taskid, [T.RESULT_UPLOADED, T.FINALIZE_FAILED], T.FINALIZING
        )
        if claimed is None:
            return False
        callback = claimed.get("callbackData") or ""
        try:
            receipt = actions.finalize(
                self.wallet,
                taskid,
                claimed["resultLink"].encode(),
                bytes.fromhex(callback.removeprefix("0x")) if callback else b"",
            )
        except TransactionReverted as exc:
            if self.client.view_task(taskid).status == ChainTaskStatus.COMPLETED:
                self._complete(taskid, note="finalized by another scheduler")
                return True
            self.store.transition_task(
                taskid, T.FINALIZE_FAILED, note=str(exc), extra={"failureReason": str(exc)}
            )
            log.error("finalize %s failed: %s", taskid, exc)
            return False
        except PocoError as exc:  # transport: the tick retries from FINALIZE_FAILED
            self.store.transition_task(taskid, T.FINALIZE_FAILED, note=str(exc))
            return False
        self.store.transition_task(taskid, T.FINALIZED, tx_hash=receipt.tx_hash)
        self._complete(taskid)
        log.info("task %s finalized (%s)", taskid, receipt.tx_hash)
        return True

    def _complete(self, taskid: str, note: str | None = None) -> None:
        task = self.store.task(taskid)
        if task is not None and task["status"] != str(T.COMPLETED):
            if task["status"] != str(T.FINALIZED):
                self.store.claim_task(
                    taskid,
                    [T.FINALIZING, T.FINALIZE_FAILED, T.FINAL_DEADLINE_REACHED],
                    T.FINALIZED,
                    note=note,
                )
            self.store.transition_task(taskid, T.COMPLETED, note=note)
        for rep in self.store.replicates_of(taskid):
            if rep["status"] in (str(R.REVEALED), str(R.RESULT_UPLOADED), str(R.CONTRIBUTED)):
                self.store.advance_replicate(taskid, rep["worker"], R.COMPLETED)

    # ---- the slow path: reconcile with the chain every tick -------------------------------
    def reconcile(self, report: TickReport) -> None:
        now = self.client.block_timestamp()
        self.claim_expired(now, report)
        for task in self.store.tasks_in(CONTRIBUTING):
            reps = self.store.replicates_of(task["chainTaskId"])
            if any(r["status"] == str(R.CONTRIBUTED) for r in reps):
                self.check_consensus(task["chainTaskId"])
        for task in self.store.tasks_in([T.AT_LEAST_ONE_REVEALED]):
            self.request_upload(task["chainTaskId"])
        for task in self.store.tasks_in([T.RESULT_UPLOADED, T.FINALIZE_FAILED]):
            self.finalize(task["chainTaskId"])

    def claim_expired(self, now: int, report: TickReport) -> None:
        """Tasks past their final deadline end on chain: claimed (FAILED) or already final."""
        live = [s for s in TaskStatus if s not in FINAL_TASK_STATUSES]
        for task in self.store.tasks_in(live, finalDeadline={"$lte": now}):
            taskid = task["chainTaskId"]
            self.store.claim_task(taskid, [TaskStatus(task["status"])], T.FINAL_DEADLINE_REACHED)
            chain = self.client.view_task(taskid)
            if chain.status == ChainTaskStatus.COMPLETED:
                self.store.transition_task(taskid, T.COMPLETED, note="completed on chain")
                continue
            if chain.status in (ChainTaskStatus.ACTIVE, ChainTaskStatus.REVEALING):
                try:
                    receipt = actions.claim(self.wallet, taskid)
                except PocoError as exc:
                    log.error("claim %s failed: %s", taskid, exc)
                    report.errors.append(f"claim {taskid}: {exc}")
                    continue
                self.store.transition_task(
                    taskid,
                    T.FAILED,
                    tx_hash=receipt.tx_hash,
                    note="final deadline reached: claimed, requester refunded",
                )
            else:  # FAILED (claimed by someone) or UNSET (never initialized)
                self.store.transition_task(
                    taskid, T.FAILED, note=f"final deadline reached (chain: {chain.status.name})"
                )
            report.tasks_claimed += 1
            log.warning("task %s failed: final deadline reached", taskid)

    def _send(self, name: str, worker: str, taskid: str) -> None:
        self.s.celery.send_task(name, args=[taskid], queue=worker_queue(worker))


_REPORT_FIELDS = {
    "reason",
    "logTail",
    "resultDigest",
    "resultLink",
    "callbackData",
    "exitCode",
    "duration",
}
_HEARTBEAT_FIELDS = {
    "name",
    "capabilities",
    "slots",
    "busySlots",
    "version",
    "cpus",
    "memoryMb",
    "gpu",
    "tee",
}


def _refuse(reason: str, requeue: bool) -> dict[str, Any]:
    return {"granted": False, "reason": reason, "requeue": requeue}
