"""From revealed results to a completed task: ask a winner to upload the result, finalize
on chain with its link, record who was proved; complete a task a trust-1 worker finalized
itself; claim what passed its final deadline."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from eth_utils import keccak

from poco import actions
from poco.chain import Receipt
from poco.errors import PocoError, TransactionReverted
from poco.results import callback_bytes
from poco.types import ChainTaskStatus, ContributionStatus, Task
from pool.clock import utcnow
from pool.redact import redact_urls
from pool.states import FINAL_TASK_STATUSES, ReplicateStatus, TaskStatus
from pool.states import ReplicateStatusCause as Cause
from scheduler.context import CONTRIBUTING, STILL_RUNNING, SchedulerContext, TickReport
from scheduler.fleet import Fleet

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

_NOT_UPLOADING = frozenset(str(s) for s in R if s != R.RESULT_UPLOADING)


class Finalizer:
    def __init__(self, ctx: SchedulerContext, fleet: Fleet) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.wallet = ctx.wallet
        self.fleet = fleet

    # ---- upload ---------------------------------------------------------------------------
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
        pause = self.ctx.settings.reveal_timeout_period / 1000
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
        self.ctx.messages.upload(revealed[0], taskid)
        return True

    def uploaded(self, taskid: str, uploader: str, link: str, callback_data: str) -> None:
        """The worker asked to upload published the result at ``link``: finalize with it
        (a link from any other worker, or once the upload was asked of another, is not
        taken). The task may be back to AT_LEAST_ONE_REVEALED when the upload was given up
        as timed out before the report came: the link is still the asked uploader's."""
        self.store.claim_task(
            taskid,
            [T.RESULT_UPLOADING, T.AT_LEAST_ONE_REVEALED],
            T.RESULT_UPLOADED,
            extra={"resultLink": link, "callbackData": callback_data},
            match={"uploader": uploader.lower()},
        )
        self.finalize(taskid)

    def upload_timeouts(self) -> None:
        """An uploader silent for REVEAL_TIMEOUT_PERIOD: ask another revealed worker."""
        period = self.ctx.settings.reveal_timeout_period / 1000
        cutoff = utcnow() - dt.timedelta(seconds=period)
        for task in self.store.tasks_due(
            [T.RESULT_UPLOADING], "uploadRequestedAt", cutoff, fields=("uploader",)
        ):
            self.upload_failed(task["chainTaskId"], task.get("uploader", ""), "timed out")

    def retry_uploads(self) -> None:
        """Tasks whose every winner failed to upload: asked again ``REVEAL_TIMEOUT_PERIOD``
        after the last failure."""
        pause = self.ctx.settings.reveal_timeout_period / 1000
        cutoff = utcnow() - dt.timedelta(seconds=pause)
        for task in self.store.tasks_due(
            [T.AT_LEAST_ONE_REVEALED], "uploadFailedAt", cutoff, fields=()
        ):
            self.request_upload(task["chainTaskId"])

    def retry_finalize(self, now: int) -> None:
        """Finalize what is due: a failed finalize once its back-off is over, and a result
        uploaded while some winners had not revealed once the reveal deadline (chain time
        ``now``) has passed (a winner's late reveal marks its task for the next tick)."""
        for task in (
            *self.store.tasks_due([T.FINALIZE_FAILED], "finalizeRetryAt", utcnow(), fields=()),
            *self.store.tasks_due([T.RESULT_UPLOADED], "revealDeadline", now, fields=()),
        ):
            self.finalize(task["chainTaskId"])

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
                self.ctx.settings.reveal_timeout_period / 1000,
            )

    # ---- finalize -------------------------------------------------------------------------
    def finalize(self, taskid: str) -> bool:
        task = self.store.task(taskid)
        if task is None or task["status"] not in (str(T.RESULT_UPLOADED), str(T.FINALIZE_FAILED)):
            return False
        due = task.get("finalizeRetryAt")
        if task["status"] == str(T.FINALIZE_FAILED) and due is not None and due > utcnow():
            return False  # backing off
        chain = self.client.view_task(taskid)
        if chain.status == ChainTaskStatus.COMPLETED:
            self.complete(taskid, note="found completed on chain")
            return True
        if not (
            chain.reveal_counter == chain.winner_counter
            # the chain time only when some winners did not reveal
            or (chain.reveal_counter > 0 and chain.reveal_deadline <= self.client.block_timestamp())
        ):
            return False  # wait for the other winners or the reveal deadline (next tick)
        claimed = self.store.claim_task(
            taskid,
            [T.RESULT_UPLOADED, T.FINALIZE_FAILED],
            T.FINALIZING,
            extra={"reviewAt": self.ctx.interrupted_after()},  # should this process die
        )
        if claimed is None:
            return False
        try:
            # the parser the worker hashed it with: what was hashed is what is sent
            callback = callback_bytes(str(claimed.get("callbackData") or ""))
        except ValueError as exc:
            self._finalize_failed(claimed, f"the uploader's callback data: {exc}")
            log.error("finalize %s: %s", taskid, exc)
            return False
        try:
            receipt = actions.finalize(
                self.wallet, taskid, claimed["resultLink"].encode(), callback
            )
        except TransactionReverted as exc:
            if self.client.view_task(taskid).status == ChainTaskStatus.COMPLETED:
                self.complete(taskid, note="finalized by another scheduler")
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
        self.complete(taskid)
        log.info("task %s finalized (%s)", taskid, receipt.tx_hash)
        return True

    def _finalize_failed(self, task: dict[str, Any], reason: str) -> None:
        """Record the failure and when to retry: 2, 4, 8 … seconds, at most 5 minutes (the
        reason's URLs masked: a chain node's URL may hold its API key)."""
        reason = redact_urls(reason)
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

    def finalized_by_worker(self, taskid: str, worker: str, chain: Task) -> None:
        """A trust-1 task the worker finished with contributeAndFinalize: record it, with the
        result link the chain holds (``chain``: a viewTask that said COMPLETED), never the
        one a report carries."""
        callback = chain.results_callback
        claimed = self.store.claim_task(
            taskid,
            CONTRIBUTING,
            T.FINALIZED,
            # the transaction is the worker's: its hash is on the replicate's COMPLETED
            note=f"contributeAndFinalize by {worker.lower()}",
            extra={
                "resultLink": chain.results.decode(errors="replace"),
                "callbackData": "0x" + callback.hex() if callback else "",
                "reviewAt": self.ctx.interrupted_after(),
            },
        )
        if claimed is None:
            return
        self.fleet.succeeded(worker)
        self.store.count_verdict(worker, proved=True)
        self.complete(taskid)
        log.info("task %s finalized by %s (contributeAndFinalize)", taskid, worker)

    def completed_on_chain(self, taskid: str, chain: Task) -> None:
        """The chain says COMPLETED while we still collect contributions: a worker's
        contributeAndFinalize whose report never came."""
        claimed = self.store.claim_task(
            taskid,
            CONTRIBUTING,
            T.FINALIZED,
            note="found finalized on chain (contributeAndFinalize)",
            extra={
                "resultLink": chain.results.decode(errors="replace"),
                "reviewAt": self.ctx.interrupted_after(),
            },
        )
        if claimed is None:
            return
        for worker in chain.contributors:
            self.store.advance_replicate(taskid, worker, R.COMPLETED, note="finalized on chain")
        self.complete(taskid)

    def complete(self, taskid: str, note: str | None = None) -> None:
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
        # a replicate still under way (planned again meanwhile) is not needed any more
        self.ctx.abort_replicates(
            taskid, STILL_RUNNING, Cause.CONSENSUS_REACHED, "the task completed without it"
        )

    def _record_contributions(
        self, taskid: str, contributors: Sequence[str], receipt: Receipt
    ) -> None:
        """After finalize: who was proved, who was rejected (stake seized, score cut).

        finalize emits AccurateContribution or FaultyContribution for each contributor; a
        contributor the receipt says nothing about is read from the chain (viewContribution:
        PROVED once revealed)."""
        verdicts = contribution_verdicts(receipt, taskid, self.client.hub_address)
        log.debug("task %s: %d verdict(s) from the finalize events", taskid, len(verdicts))
        for worker in contributors:
            proved = verdicts.get(worker.lower())
            if proved is None:
                c = self.client.view_contribution(taskid, worker)
                proved = c.status == ContributionStatus.PROVED
            self.store.count_verdict(worker, proved)
            verdict = "PROVED" if proved else "REJECTED"
            self.store.set_replicate_fields(taskid, worker, {"contribution": verdict})
            if not proved and self.store.advance_replicate(
                taskid,
                worker,
                R.ABORTED,
                note="contribution rejected: it lost the consensus, its stake was seized",
                cause=str(Cause.CONSENSUS_REACHED),
            ):
                # its node keeps the result it computed until told: nothing more to do with it
                self.ctx.send_abort(
                    worker, taskid, Cause.CONSENSUS_REACHED, "contribution rejected"
                )

    # ---- the final deadline -----------------------------------------------------------------
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
            self.ctx.abort_replicates(
                taskid, STILL_RUNNING, Cause.UNKNOWN, "the task reached its final deadline"
            )
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
        size = self.ctx.settings.init_batch_size
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
