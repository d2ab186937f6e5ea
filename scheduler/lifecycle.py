"""The scheduler's second half: authorize workers, follow their reports, reach consensus,
ask for reveals and the upload, finalize; claim what passed its final deadline.

Reports from workers drive the fast path (a CONTRIBUTED report checks consensus at once, a
RESULT_UPLOADED report finalizes at once); the tick's :meth:`Lifecycle.reconcile` is the slow
path that repairs anything a lost message or a crash left behind, reading the chain as truth.
Every step that sends a transaction first wins a strict compare-and-set on the task's status,
so concurrent threads or schedulers never send it twice.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from eth_utils import keccak

from poco import actions
from poco.chain import Receipt
from poco.consensus import more_replicates_needed, simulate
from poco.errors import PocoError, TransactionReverted
from poco.orders import ZERO_ADDRESS
from poco.proofs import sign_authorization
from poco.types import ChainTaskStatus, ContributionStatus, Task
from pool.celery_app import (
    REPLICATE_QUEUES,
    REVEAL_TASK,
    SEEN_PREFIX,
    UPLOAD_TASK,
    worker_queue,
)
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
# task statuses between consensus and finalize: winners may still have to reveal
REVEAL_PHASE = {
    str(s)
    for s in (T.CONSENSUS_REACHED, T.AT_LEAST_ONE_REVEALED, T.RESULT_UPLOADING, T.RESULT_UPLOADED)
}
# replicates under way (their worker may still contribute)
IN_FLIGHT = {
    str(s)
    for s in (R.CREATED, R.STARTING, R.APP_DOWNLOADING, R.COMPUTING, R.COMPUTED, R.CONTRIBUTING)
}
# a replicate WORKER_LOST, or CONTRIBUTING for this many seconds, may have contributed (or
# contributed and finalized) without its report reaching us: the chain is asked. Not sooner:
# the report of a live worker carries the transaction hash.
UNREPORTED_GRACE = 15.0
# the tick's own look at the chain for a task (consensus reached, an unreported contribution)
# is a safety net behind the reports: once per task per this many seconds, not every tick,
# so that 10,000 tasks in flight cost no 10,000 eth_calls per tick (ops/bench scale)
CHAIN_RECHECK = 30.0
# failures that come from the app or its inputs: re-running elsewhere proves nothing
APP_FAULTS = {str(s) for s in (R.APP_DOWNLOAD_FAILED, R.DATA_DOWNLOAD_FAILED, R.COMPUTE_FAILED)}
QUEUE_CAPABILITY = {queue: name for name, queue in REPLICATE_QUEUES.items()}
# the projection of the passes that only need the task's id
_ID = ("chainTaskId",)
# ... and of the safety-net passes that ask the chain at most every CHAIN_RECHECK
_CHECKED = ("chainTaskId", "chainCheckedAt")
# a worker asks for authorization before computing: keep at least this much time
MIN_TIME_LEFT_RATIO = 1.0  # x the category time reference
INTERRUPTED_MARGIN = 10.0  # seconds beyond WORKERPOOL_TX_TIMEOUT: see recover_interrupted


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
        record = self.store.workers.find_one({"address": worker.lower()}) or {}
        paused = record.get("pausedUntil")
        if paused is not None and paused > utcnow():
            return _refuse(
                f"worker {worker} is paused until {paused} after repeated failures", True
            )
        # asked for every job: a chain time up to 1 s old is exact enough for a margin of
        # MIN_TIME_LEFT_RATIO x timeref, and saves a block read per authorization
        now = self.client.block_timestamp(max_age=1.0)
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
        if task.get("waitingReason"):
            self.store.set_task_fields(taskid, {"waitingReason": ""})
        signature = sign_authorization(self.s.wallet.account.key, worker, taskid, enclave)
        log.info("authorized %s on task %s", worker, taskid)
        return {
            "granted": True,
            "signature": signature,
            "enclave": enclave,
            "workerpool": self.s.pool,
            # trust 1: the worker contributes, reveals and finalizes in one transaction
            "fastPath": task.get("trust") == 1 and self.s.settings.contribute_and_finalize,
        }

    # ---- worker reports ----------------------------------------------------------------------
    def on_report(
        self, taskid: str, worker: str, status: str, details: dict[str, Any] | None = None
    ) -> None:
        details = details or {}
        target = ReplicateStatus(status)
        extra = {k: v for k, v in details.items() if k in _REPORT_FIELDS}
        upload_failed = target == R.REVEALED and bool(details.get("uploadFailed"))
        doc = self.store.advance_replicate(
            taskid,
            worker,
            target,
            tx_hash=details.get("txHash"),
            note=details.get("reason") or details.get("note"),
            extra=extra,
            # REVEALED after RESULT_UPLOADING means "upload failed" only when it says so; a
            # late or repeated reveal report (a resumed node) must not undo the upload
            stale_from=_UPLOADING if target == R.REVEALED and not upload_failed else frozenset(),
        )
        if doc is None:
            log.info("stale or unknown report %s from %s on %s", status, worker, taskid)
            return
        if target == R.CONTRIBUTED:
            self._worker_succeeded(worker)
            task = self.store.task(taskid) or {}
            if task.get("status") in REVEAL_PHASE:
                self.request_reveals(taskid)  # consensus came with another contribution
            elif not self.check_consensus(taskid):
                self.replan(taskid)
        elif target == R.REVEALED:
            task = self.store.task(taskid) or {}
            if (
                upload_failed
                and task.get("status") == str(T.RESULT_UPLOADING)
                and task.get("uploader") == worker.lower()
            ):
                self.upload_failed(taskid, worker.lower(), details.get("reason", "failed"))
            else:
                self.after_reveal(taskid)
        elif target == R.RESULT_UPLOADED:
            self.after_upload(taskid, details)
        elif target == R.COMPLETED and details.get("finalized"):
            self.finalized_by_worker(taskid, worker, details)
        elif target == R.RESULT_UPLOADING:
            pass
        elif str(target) in DEAD_REPLICATES:
            log.warning(
                "replicate of %s on %s: %s (%s)", worker, taskid, status, details.get("reason", "")
            )

    def heartbeat(self, worker: str, info: dict[str, Any]) -> None:
        fields = {k: v for k, v in info.items() if k in _HEARTBEAT_FIELDS}
        previous = self.store.workers.find_one({"address": worker.lower()}, {"status": 1})
        if previous is not None and previous.get("status") == "LOST":
            log.info("worker %s is back", worker)
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
        if chain.status == ChainTaskStatus.COMPLETED:
            self._completed_on_chain(taskid, chain)
            return True
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
                "chainCheckedAt": utcnow(),  # the winners are asked below, from this state
            },
        )
        if task is None:
            return False
        log.info("task %s reached consensus", taskid)
        self.request_reveals(taskid, chain)  # the state just read: not read again
        return True

    def request_reveals(self, taskid: str, chain: Task | None = None) -> int:
        """Ask every winner that has not been asked yet to reveal. Reads the winners from the
        chain (``chain``: a viewTask the caller has just read), so a contribution whose report
        is late or lost is still asked for; winners already asked are not read again."""
        if chain is None:
            chain = self.client.view_task(taskid)
        if chain.status != ChainTaskStatus.REVEALING:
            return 0
        replicates = {r["worker"]: r for r in self.store.replicates_of(taskid)}
        asked = 0
        for worker in chain.contributors:
            rep = replicates.get(worker.lower())
            if rep is None or rep.get("revealRequested"):
                continue
            contribution = self.client.view_contribution(taskid, worker)
            if (
                contribution.status != ContributionStatus.CONTRIBUTED
                or contribution.result_hash != chain.consensus_value
            ):
                continue
            if rep["status"] in IN_FLIGHT or rep["status"] == str(R.WORKER_LOST):
                self.store.advance_replicate(
                    taskid, worker, R.CONTRIBUTED, note="contribution seen on chain"
                )
            claimed = self.store.replicates.update_one(
                {"chainTaskId": taskid, "worker": worker.lower(), "revealRequested": {"$ne": True}},
                {"$set": {"revealRequested": True}},
            )
            if claimed.modified_count:
                self._send(REVEAL_TASK, worker, taskid)
                asked += 1
        return asked

    def after_reveal(self, taskid: str) -> None:
        self.store.claim_task(taskid, [T.CONSENSUS_REACHED], T.AT_LEAST_ONE_REVEALED)
        self.request_upload(taskid)

    def request_upload(self, taskid: str, exclude: set[str] | None = None) -> bool:
        """Ask a revealed worker to upload the result, one whose upload has not failed yet;
        when every one failed (IPFS down), ask them again ``REVEAL_TIMEOUT_PERIOD`` after the
        last failure rather than wait for the final deadline."""
        task = self.store.task(taskid) or {}
        failed = set(task.get("uploadFailed", []))
        winners = [
            r["worker"] for r in self.store.replicates_of(taskid) if r["status"] == str(R.REVEALED)
        ]
        revealed = [w for w in winners if w not in failed and w not in (exclude or set())]
        failed_at = task.get("uploadFailedAt")
        pause = self.s.settings.reveal_timeout_period / 1000
        paused = failed_at is not None and (utcnow() - failed_at).total_seconds() > pause
        if not revealed and exclude is None and paused:
            revealed = winners  # every winner failed once: try again after a pause
        if not revealed:
            return False
        claimed = self.store.claim_task(
            taskid,
            [T.AT_LEAST_ONE_REVEALED],
            T.RESULT_UPLOADING,
            extra={"uploader": revealed[0], "uploadRequestedAt": utcnow()},
        )
        if claimed is None:
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

    def finalized_by_worker(self, taskid: str, worker: str, details: dict[str, Any]) -> None:
        """A trust-1 task the worker finished with contributeAndFinalize: record it."""
        claimed = self.store.claim_task(
            taskid,
            CONTRIBUTING,
            T.FINALIZED,
            # the transaction is the worker's: its hash is on the replicate's COMPLETED
            note=f"contributeAndFinalize by {worker.lower()}",
            extra={
                "resultLink": details.get("resultLink", ""),
                "callbackData": details.get("callbackData", ""),
            },
        )
        if claimed is None:
            return
        self._worker_succeeded(worker)
        self.store.workers.update_one({"address": worker.lower()}, {"$inc": {"accepted": 1}})
        self._complete(taskid)
        log.info("task %s finalized by %s (contributeAndFinalize)", taskid, worker)

    def _completed_on_chain(self, taskid: str, chain: Task) -> None:
        """The chain says COMPLETED while we still collect contributions: a worker's
        contributeAndFinalize whose report never came."""
        claimed = self.store.claim_task(
            taskid,
            CONTRIBUTING,
            T.FINALIZED,
            note="found finalized on chain (contributeAndFinalize)",
            extra={"resultLink": chain.results.decode(errors="replace")},
        )
        if claimed is None:
            return
        for worker in chain.contributors:
            self.store.advance_replicate(taskid, worker, R.COMPLETED, note="finalized on chain")
        self._complete(taskid)

    def finalize(self, taskid: str) -> bool:
        task = self.store.task(taskid)
        if task is None or task["status"] not in (str(T.RESULT_UPLOADED), str(T.FINALIZE_FAILED)):
            return False
        due = task.get("finalizeRetryAt")
        if task["status"] == str(T.FINALIZE_FAILED) and due is not None and due > utcnow():
            return False  # backing off
        chain = self.client.view_task(taskid)
        if chain.status == ChainTaskStatus.COMPLETED:
            self._complete(taskid, note="found completed on chain")
            return True
        if not (
            chain.reveal_counter == chain.winner_counter
            # the chain time only when some winners did not reveal
            or (chain.reveal_counter > 0 and chain.reveal_deadline <= self.client.block_timestamp())
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
            self._finalize_failed(claimed, str(exc))
            log.error("finalize %s failed: %s", taskid, exc)
            return False
        except PocoError as exc:  # transport: the tick retries from FINALIZE_FAILED
            self._finalize_failed(claimed, str(exc))
            return False
        self.store.transition_task(taskid, T.FINALIZED, tx_hash=receipt.tx_hash)
        # finalize changes no contributor: the list read above stands, the verdicts are in
        # the receipt's events
        self._record_contributions(taskid, chain.contributors, receipt)
        self._complete(taskid)
        log.info("task %s finalized (%s)", taskid, receipt.tx_hash)
        return True

    def _finalize_failed(self, task: dict[str, Any], reason: str) -> None:
        """Record the failure and when to retry: 2, 4, 8 … seconds, at most 5 minutes."""
        attempts = int(task.get("finalizeAttempts", 0)) + 1
        delay = min(2**attempts, 300)
        self.store.transition_task(
            task["chainTaskId"],
            T.FINALIZE_FAILED,
            note=reason,
            extra={
                "failureReason": reason,
                "finalizeAttempts": attempts,
                "finalizeRetryAt": utcnow() + dt.timedelta(seconds=delay),
            },
        )

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

    # ---- the fleet: re-planning, reliability, lost and paused workers ---------------------
    def replan(self, taskid: str) -> int:
        """Plan more replicates when the ones granted cannot reach consensus: contributions
        that disagree, or replicates lost with their worker. Bounded BOINC-style by
        WORKERPOOL_MAX_REPLICATES and WORKERPOOL_MAX_ERRONEOUS. Returns the jobs added."""
        task = self.store.task(taskid)
        if task is None or task["status"] not in {str(s) for s in CONTRIBUTING}:
            return 0
        reps = self.store.replicates_of(taskid)
        if any(r["status"] in IN_FLIGHT for r in reps):
            return 0  # wait for the replicates under way
        if any(r["status"] in APP_FAULTS for r in reps):
            return 0  # the app fails by itself: running it elsewhere proves nothing
        if task.get("replicatesNeeded", 0) > task.get("replicatesGranted", 0):
            return 0  # jobs are still waiting in the queue for a worker
        chain = self.client.view_task(taskid)
        if chain.status != ChainTaskStatus.ACTIVE:
            return 0
        contributions = []
        for worker in chain.contributors:
            c = self.client.view_contribution(taskid, worker)
            if c.status != ContributionStatus.REJECTED:  # rejected by a reopen: out of the count
                contributions.append((c.result_hash, 2**c.weight))
        more = more_replicates_needed(contributions, task["trust"])
        if more == 0:
            return 0
        groups, _ = simulate(contributions)
        erroneous = len(contributions) - max(
            (sum(1 for h, _ in contributions if h == best) for best in groups), default=0
        )
        settings = self.s.settings
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
        doc = self.store.tasks.find_one_and_update(
            {"chainTaskId": taskid, "replicatesNeeded": task["replicatesNeeded"]},
            {
                "$inc": {"replicatesNeeded": more, "jobsQueued": more},
                "$push": {
                    "timeline": {
                        "status": task["status"],
                        "at": utcnow(),
                        "note": f"planned {more} more replicate(s)",
                    }
                },
            },
            projection={"_id": 0},
        )
        if doc is None:
            return 0  # another thread re-planned first
        for _ in range(more):
            self.s.enqueue(doc)
        log.info(
            "task %s: planned %d more replicate(s) (%d contributions so far)",
            taskid,
            more,
            len(contributions),
        )
        return more

    def _record_contributions(
        self, taskid: str, contributors: Sequence[str], receipt: Receipt
    ) -> None:
        """After finalize: who was proved, who was rejected (stake seized, score cut).

        finalize emits AccurateContribution or FaultyContribution for each contributor; a
        contributor the receipt says nothing about is read from the chain (viewContribution:
        PROVED once revealed)."""
        verdicts = contribution_verdicts(receipt, taskid, getattr(self.client, "hub_address", None))
        log.debug("task %s: %d verdict(s) from the finalize events", taskid, len(verdicts))
        for worker in contributors:
            proved = verdicts.get(worker.lower())
            if proved is None:
                c = self.client.view_contribution(taskid, worker)
                proved = c.status == ContributionStatus.PROVED
            self.store.workers.update_one(
                {"address": worker.lower()},
                {"$inc": {"accepted" if proved else "rejected": 1}},
            )
            verdict = "PROVED" if proved else "REJECTED"
            self.store.replicates.update_one(
                {"chainTaskId": taskid, "worker": worker.lower()},
                {"$set": {"contribution": verdict}},
            )
            if not proved:
                self.store.advance_replicate(
                    taskid,
                    worker,
                    R.ABORTED,
                    note="contribution rejected: it lost the consensus, its stake was seized",
                )

    def _worker_succeeded(self, worker: str) -> None:
        self.store.workers.update_one(
            {"address": worker.lower()}, {"$set": {"consecutiveFailures": 0}}
        )

    def _worker_failed(self, worker: str) -> None:
        doc = self.store.workers.find_one_and_update(
            {"address": worker.lower()},
            {"$inc": {"consecutiveFailures": 1, "failures": 1}},
            return_document=True,
        )
        settings = self.s.settings
        if doc is not None and doc.get("consecutiveFailures", 0) >= settings.worker_max_failures:
            until = utcnow() + dt.timedelta(seconds=settings.worker_pause)
            self.store.workers.update_one(
                {"address": worker.lower()},
                {"$set": {"pausedUntil": until, "consecutiveFailures": 0}},
            )
            log.warning(
                "worker %s paused until %s after %d failures",
                worker,
                until,
                settings.worker_max_failures,
            )

    def detect_lost_workers(self) -> int:
        """Workers silent for WORKER_LOST_TIMEOUT are LOST; their unfinished replicates are
        WORKER_LOST and planned on others."""
        timeout = self.s.settings.worker_lost_timeout
        cutoff = utcnow() - dt.timedelta(seconds=timeout)
        lost = 0
        for record in self.store.workers.find({"status": "ALIVE"}):
            if not self._silent(record, cutoff, timeout):
                continue
            done = self.store.workers.update_one(
                {"address": record["address"], "status": "ALIVE"},
                {"$set": {"status": "LOST", "lostAt": utcnow()}},
            )
            if not done.modified_count:
                continue
            lost += 1
            log.warning(
                "worker %s is lost (last heartbeat %s)", record["address"], record["lastSeen"]
            )
            for rep in self.store.replicates.find(
                {"worker": record["address"], "status": {"$in": sorted(IN_FLIGHT)}}
            ):
                self.store.transition_replicate(
                    rep["chainTaskId"],
                    rep["worker"],
                    R.WORKER_LOST,
                    note="no heartbeat for WORKER_LOST_TIMEOUT",
                )
                self.replan(rep["chainTaskId"])
        return lost

    def _silent(self, record: dict[str, Any], cutoff: dt.datetime, timeout: float) -> bool:
        """Silent for longer than the timeout? Nodes write their heartbeat time straight into
        Redis; the Mongo ``lastSeen`` (set by heartbeat messages) is the fallback."""
        if self.s.redis is not None:
            seen = self.s.redis.get(f"{SEEN_PREFIX}{record['address']}")
            if seen is not None:
                return time.time() - float(seen) > timeout
        return bool(record.get("lastSeen") and record["lastSeen"] < cutoff)

    def explain_waiting(self, task: dict[str, Any], serving: dict[str, int] | None = None) -> None:
        """A task nobody took: say so when no live worker serves its queue.

        ``serving`` caches the count of live workers per queue across the tasks of one
        pass (one count per queue, not one per waiting task)."""
        queue = task["queue"]
        counts = {} if serving is None else serving
        if queue not in counts:
            capability = QUEUE_CAPABILITY.get(queue, queue)
            counts[queue] = self.store.workers.count_documents(
                {"status": "ALIVE", "capabilities": capability}
            )
        reason = "" if counts[queue] else f"waiting: no live worker serves {queue}"
        if task.get("waitingReason", "") != reason:
            self.store.set_task_fields(task["chainTaskId"], {"waitingReason": reason})

    # ---- the slow path: reconcile with the chain every tick -------------------------------
    def reconcile(self, report: TickReport) -> None:
        """Every tick: the detectors, then each unfinished task is moved on from what the
        store and the chain say. Its store cost does not grow with the running tasks beyond
        what they need: tasks are read with projections, replicates with one query per
        :data:`pool.store.IN_BATCH` tasks, serving workers counted once per queue."""
        now = self.client.block_timestamp()
        self.claim_expired(now, report)
        self.contribution_timeouts(now)
        self.reveal_timeouts(now)
        self.upload_timeouts()
        self.recover_interrupted()
        self.detect_lost_workers()
        self.reconcile_contributing()
        # winners whose contribution was never reported are found on chain: a safety net
        # behind the reports, so at most once per CHAIN_RECHECK per task
        for task in self.store.tasks_in(
            [TaskStatus(x) for x in REVEAL_PHASE], fields=_CHECKED, ordered=False
        ):
            if self._chain_check_due(task):
                self.request_reveals(task["chainTaskId"])
        for task in self.store.tasks_in([T.AT_LEAST_ONE_REVEALED], fields=_ID, ordered=False):
            self.request_upload(task["chainTaskId"])
        for task in self.store.tasks_in(
            [T.RESULT_UPLOADED, T.FINALIZE_FAILED], fields=_ID, ordered=False
        ):
            self.finalize(task["chainTaskId"])

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
        cutoff = utcnow() - dt.timedelta(seconds=self.s.settings.tx_timeout + INTERRUPTED_MARGIN)
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
                    self._complete(taskid, note=f"finalize {why}: completed on chain")
                elif status == str(T.FINALIZING):
                    log.warning("task %s: finalize %s: trying again", taskid, why)
                    self.store.claim_task(
                        taskid,
                        [T.FINALIZING],
                        T.FINALIZE_FAILED,
                        note=f"finalize {why}: not completed on chain, trying again",
                    )
            elif chain.status == ChainTaskStatus.ACTIVE:  # REOPENING, and the reopen was mined
                self._abort_silent_winners(taskid)
                self.store.claim_task(
                    taskid, [T.REOPENING], T.REOPENED, note=f"reopen {why}: reopened on chain"
                )
                self.replan(taskid)
            elif chain.status == ChainTaskStatus.REVEALING:
                self.store.claim_task(
                    taskid, [T.REOPENING], T.CONSENSUS_REACHED, note=f"reopen {why}: not mined"
                )

    def reconcile_contributing(self) -> None:
        """Tasks collecting contributions: say why nobody took a task, check consensus when
        a contribution is in, re-plan when no replicate is under way."""
        tasks = self.store.tasks_in(
            CONTRIBUTING,
            fields=("chainTaskId", "queue", "waitingReason", "chainCheckedAt"),
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
                self.explain_waiting(task, serving)
            elif str(R.CONTRIBUTED) in statuses:
                # no consensus yet: more replicates may be needed (their replicates failed)
                if self._chain_check_due(task) and not self.check_consensus(taskid):
                    self.replan(taskid)
            elif unreported and self._chain_check_due(task) and self.check_consensus(taskid):
                pass  # a contribution whose report never came reached consensus on chain
            elif not statuses & IN_FLIGHT:
                # (replan returns at once while a replicate is under way: not even asked)
                self.replan(taskid)

    def claim_expired(self, now: int, report: TickReport) -> None:
        """Tasks past their final deadline end on chain: claimed (FAILED, requester refunded,
        batched with claimArray) or found final there."""
        live = [s for s in TaskStatus if s not in FINAL_TASK_STATUSES]
        claimable: list[str] = []
        for task in self.store.tasks_in(
            live, fields=("chainTaskId", "status"), finalDeadline={"$lte": now}
        ):
            taskid = task["chainTaskId"]
            self.store.claim_task(taskid, [TaskStatus(task["status"])], T.FINAL_DEADLINE_REACHED)
            self._abort_replicates(taskid, "the task reached its final deadline")
            chain = self.client.view_task(taskid)
            if chain.status == ChainTaskStatus.COMPLETED:
                self.store.transition_task(taskid, T.COMPLETED, note="completed on chain")
            elif chain.status in (ChainTaskStatus.ACTIVE, ChainTaskStatus.REVEALING):
                claimable.append(taskid)
            else:  # FAILED (claimed by someone) or UNSET (never initialized)
                self.store.transition_task(
                    taskid, T.FAILED, note=f"final deadline reached (chain: {chain.status.name})"
                )
                report.tasks_claimed += 1
        size = self.s.settings.init_batch_size
        for start in range(0, len(claimable), size):
            self._claim_batch(claimable[start : start + size], report)

    def _claim_batch(self, batch: list[str], report: TickReport) -> None:
        try:
            if len(batch) == 1:
                receipt = actions.claim(self.wallet, batch[0])
            else:
                receipt = actions.claim_array(self.wallet, batch)
        except TransactionReverted as exc:
            if len(batch) > 1:  # one bad task: claim them one by one
                for taskid in batch:
                    self._claim_batch([taskid], report)
                return
            if self.client.view_task(batch[0]).status == ChainTaskStatus.FAILED:
                self.store.transition_task(batch[0], T.FAILED, note="claimed by someone else")
                return
            log.error("claim %s failed: %s", batch[0], exc)
            report.errors.append(f"claim {batch[0]}: {exc}")
            return
        except PocoError as exc:  # transport: the next tick tries again
            report.errors.append(f"claim {len(batch)} task(s): {exc}")
            return
        for taskid in batch:
            self.store.transition_task(
                taskid,
                T.FAILED,
                tx_hash=receipt.tx_hash,
                note="final deadline reached: claimed, requester refunded",
            )
            report.tasks_claimed += 1
            log.warning("task %s failed: final deadline reached, claimed", taskid)

    def _abort_replicates(self, taskid: str, why: str) -> None:
        for rep in self.store.replicates_of(taskid):
            if rep["status"] in IN_FLIGHT:
                self.store.advance_replicate(taskid, rep["worker"], R.ABORTED, note=why)

    # ---- detectors --------------------------------------------------------------------
    def contribution_timeouts(self, now: int) -> None:
        """Past the contribution deadline without consensus: CONTRIBUTION_TIMEOUT. Nothing
        can happen on chain any more until the final deadline, when the task is claimed."""
        for task in self.store.tasks_in(
            CONTRIBUTING, fields=_ID, ordered=False, contributionDeadline={"$lte": now}
        ):
            taskid = task["chainTaskId"]
            if self.check_consensus(taskid):
                continue
            if self.store.claim_task(
                taskid,
                CONTRIBUTING,
                T.CONTRIBUTION_TIMEOUT,
                note="contribution deadline passed without consensus",
            ):
                self._abort_replicates(taskid, "contribution deadline passed")
                log.warning("task %s: contribution deadline passed without consensus", taskid)

    def reveal_timeouts(self, now: int) -> None:
        """Winners slow to reveal: ask again after REVEAL_TIMEOUT_PERIOD; when the reveal
        deadline passed and nobody revealed, reopen the task and plan new replicates."""
        period = self.s.settings.reveal_timeout_period / 1000
        for task in self.store.tasks_in(
            [T.CONSENSUS_REACHED],
            fields=("chainTaskId", "revealAskedAt", "updatedAt", "revealDeadline"),
        ):
            taskid = task["chainTaskId"]
            asked = task.get("revealAskedAt") or task.get("updatedAt")
            ask_again = asked is not None and (utcnow() - asked).total_seconds() > period
            deadline = task.get("revealDeadline")
            if not ask_again and deadline is not None and deadline > now:
                continue  # nothing due before the reveal deadline: the chain is not asked
            chain = self.client.view_task(taskid)
            if chain.status != ChainTaskStatus.REVEALING:
                continue
            if chain.reveal_counter == 0 and chain.reveal_deadline <= now:
                self.reopen(taskid)
                continue
            if ask_again:
                self.store.replicates.update_many(
                    {"chainTaskId": taskid, "status": str(R.CONTRIBUTED)},
                    {"$set": {"revealRequested": False}},
                )
                self.store.set_task_fields(taskid, {"revealAskedAt": utcnow()})
                if self.request_reveals(taskid):
                    log.warning("task %s: winners asked again to reveal", taskid)

    def reopen(self, taskid: str) -> bool:
        if self.store.claim_task(taskid, [T.CONSENSUS_REACHED], T.REOPENING) is None:
            return False
        try:
            receipt = actions.reopen(self.wallet, taskid)
        except PocoError as exc:
            log.error("reopen %s failed: %s", taskid, exc)
            self.store.transition_task(taskid, T.CONSENSUS_REACHED, note=f"reopen failed: {exc}")
            return False
        self._abort_silent_winners(taskid)
        self.store.transition_task(taskid, T.REOPENED, tx_hash=receipt.tx_hash)
        log.warning("task %s reopened: no winner revealed in time", taskid)
        self.replan(taskid)
        return True

    def _abort_silent_winners(self, taskid: str) -> None:
        for rep in self.store.replicates_of(taskid):
            if rep["status"] in (str(R.CONTRIBUTED), str(R.REVEALING)):
                self.store.advance_replicate(
                    taskid,
                    rep["worker"],
                    R.ABORTED,
                    note="did not reveal before the reveal deadline: task reopened",
                )

    def upload_timeouts(self) -> None:
        """An uploader silent for REVEAL_TIMEOUT_PERIOD: ask another revealed worker."""
        period = self.s.settings.reveal_timeout_period / 1000
        for task in self.store.tasks_in(
            [T.RESULT_UPLOADING], fields=("chainTaskId", "uploadRequestedAt", "uploader")
        ):
            asked = task.get("uploadRequestedAt")
            if asked is not None and (utcnow() - asked).total_seconds() > period:
                self.upload_failed(task["chainTaskId"], task.get("uploader", ""), "timed out")

    def upload_failed(self, taskid: str, uploader: str, why: str) -> None:
        task = self.store.claim_task(
            taskid,
            [T.RESULT_UPLOADING],
            T.AT_LEAST_ONE_REVEALED,
            note=f"upload by {uploader} failed: {why}",
        )
        if task is None:
            return
        if uploader:  # a silent uploader is still RESULT_UPLOADING: it holds the result
            self.store.advance_replicate(
                taskid, uploader, R.REVEALED, note=f"upload {why}", stale_from=_NOT_UPLOADING
            )
        failed = {*task.get("uploadFailed", []), uploader}
        self.store.set_task_fields(
            taskid, {"uploadFailed": sorted(failed), "uploadFailedAt": utcnow()}
        )
        if not self.request_upload(taskid, exclude=failed):
            log.error(
                "task %s: no other revealed worker can upload the result; asking again in %ss",
                taskid,
                self.s.settings.reveal_timeout_period / 1000,
            )

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


_ACCURATE = keccak(text="AccurateContribution(address,bytes32)")
_FAULTY = keccak(text="FaultyContribution(address,bytes32)")


def contribution_verdicts(receipt: Receipt, taskid: str, hub: str | None = None) -> dict[str, bool]:
    """Worker (lower case) -> proved, from the AccurateContribution / FaultyContribution
    events of a finalize receipt (both: ``event(address indexed worker, bytes32 indexed
    taskid)``). Events of other tasks, or not emitted by ``hub`` when given, are skipped."""
    wanted = bytes.fromhex(taskid.removeprefix("0x").rjust(64, "0"))
    verdicts: dict[str, bool] = {}
    for entry in receipt.logs:
        if hub is not None and str(entry.get("address", "")).lower() != hub.lower():
            continue
        topics = [bytes(t) for t in entry.get("topics", [])]
        if len(topics) != 3 or topics[0] not in (_ACCURATE, _FAULTY) or topics[2] != wanted:
            continue
        worker = "0x" + topics[1][-20:].hex()
        verdicts[worker] = topics[0] == _ACCURATE
    return verdicts


_UPLOADING = frozenset({str(R.RESULT_UPLOADING)})
_NOT_UPLOADING = frozenset(str(s) for s in R if s != R.RESULT_UPLOADING)


def _refuse(reason: str, requeue: bool) -> dict[str, Any]:
    return {"granted": False, "reason": reason, "requeue": requeue}
