"""Consensus and reveal: notice when the chain reached consensus, ask the winners to reveal,
ask again when they are slow, reopen the task when none revealed in time; give up on a task
whose contribution deadline passed without consensus."""

from __future__ import annotations

import datetime as dt
import logging

from poco import actions
from poco.errors import PocoError
from poco.types import ChainTaskStatus, ContributionStatus, Task
from pool.clock import utcnow
from pool.states import ReplicateStatus, TaskStatus
from pool.states import ReplicateStatusCause as Cause
from scheduler.context import CONTRIBUTING, IN_FLIGHT, STILL_RUNNING, SchedulerContext
from scheduler.finalize import Finalizer
from scheduler.planning import Planner

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

SILENT_WINNERS = (str(R.CONTRIBUTED), str(R.REVEALING))


class Consensus:
    def __init__(self, ctx: SchedulerContext, planner: Planner, finalizer: Finalizer) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.planner = planner
        self.finalizer = finalizer

    def check(self, taskid: str, chain: Task | None = None) -> bool:
        """Read the task on chain (``chain``: a viewTask the caller has just read): True when
        consensus is reached (the winners are asked to reveal) or the task is already
        COMPLETED there."""
        if chain is None:
            chain = self.client.view_task(taskid)
        if chain.status == ChainTaskStatus.COMPLETED:
            self.finalizer.completed_on_chain(taskid, chain)
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
                "revealAskedAt": utcnow(),
            },
        )
        if task is None:
            return False
        log.info("task %s reached consensus", taskid)
        self.request_reveals(taskid, chain)  # the state just read: not read again
        # iexec-core's ConsensusReachedEvent: every replicate that did not contribute in time
        # is no longer needed; its node stops the container and frees the slot now
        self.ctx.abort_replicates(
            taskid,
            STILL_RUNNING,
            Cause.CONSENSUS_REACHED,
            "consensus was reached without this replicate",
        )
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
            if self.store.mark_reveal_requested(taskid, worker):
                self.ctx.messages.reveal(worker, taskid)
                asked += 1
        return asked

    def revealed(self, taskid: str) -> None:
        """A winner revealed: the result can be uploaded."""
        self.store.claim_task(taskid, [T.CONSENSUS_REACHED], T.AT_LEAST_ONE_REVEALED)
        self.finalizer.request_upload(taskid)

    def reveal_timeouts(self, now: int) -> None:
        """Winners slow to reveal: ask again after REVEAL_TIMEOUT_PERIOD; when the reveal
        deadline passed and nobody revealed, reopen the task and plan new replicates."""
        period = self.ctx.settings.reveal_timeout_period / 1000
        fields = ("revealAskedAt", "updatedAt", "revealDeadline")
        waiting = [T.CONSENSUS_REACHED]
        # due: the reveal deadline (chain time), and the time to ask again
        due = {
            t["chainTaskId"]: t
            for t in (
                *self.store.tasks_due(waiting, "revealDeadline", now, fields=fields),
                *self.store.tasks_due(
                    waiting, "revealAskedAt", utcnow() - dt.timedelta(seconds=period), fields=fields
                ),
            )
        }
        for task in due.values():
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
                self.store.reset_reveal_requests(taskid)
                self.store.set_task_fields(taskid, {"revealAskedAt": utcnow()})
                if self.request_reveals(taskid):
                    log.warning("task %s: winners asked again to reveal", taskid)

    def reopen(self, taskid: str) -> bool:
        reopening = self.store.claim_task(
            taskid,
            [T.CONSENSUS_REACHED],
            T.REOPENING,
            extra={"reviewAt": self.ctx.interrupted_after()},  # should this process die
        )
        if reopening is None:
            return False
        try:
            receipt = actions.reopen(self.ctx.wallet, taskid)
        except PocoError as exc:
            log.error("reopen %s failed: %s", taskid, exc)
            self.store.transition_task(taskid, T.CONSENSUS_REACHED, note=f"reopen failed: {exc}")
            return False
        self.abort_silent_winners(taskid)
        self.store.transition_task(taskid, T.REOPENED, tx_hash=receipt.tx_hash)
        log.warning("task %s reopened: no winner revealed in time", taskid)
        self.planner.replan(taskid)
        return True

    def abort_silent_winners(self, taskid: str) -> None:
        self.ctx.abort_replicates(
            taskid,
            SILENT_WINNERS,
            Cause.REVEAL_TIMEOUT,
            "did not reveal before the reveal deadline: task reopened",
        )

    def contribution_timeouts(self, now: int) -> None:
        """Past the contribution deadline without consensus: CONTRIBUTION_TIMEOUT. Nothing
        can happen on chain any more until the final deadline, when the task is claimed."""
        for task in self.store.tasks_due(CONTRIBUTING, "contributionDeadline", now, fields=()):
            taskid = task["chainTaskId"]
            if self.check(taskid):
                continue
            if self.store.claim_task(
                taskid,
                CONTRIBUTING,
                T.CONTRIBUTION_TIMEOUT,
                note="contribution deadline passed without consensus",
            ):
                self.ctx.abort_replicates(
                    taskid,
                    STILL_RUNNING,
                    Cause.CONTRIBUTION_TIMEOUT,
                    "the contribution deadline passed",
                )
                log.warning("task %s: contribution deadline passed without consensus", taskid)
