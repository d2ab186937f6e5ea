"""Initialization: pending tasks initialized on chain in batches (initializeArray), earliest
deadline first; a batch that reverts is split to find the task that cannot be. Before any
batch, the deals are checked to still be where the listener saw them (a chain reorganisation
may have removed them)."""

from __future__ import annotations

import logging
from typing import Any

from poco import actions
from poco.errors import TransactionReverted
from poco.types import ChainTaskStatus
from pool.redact import redact_urls
from pool.states import TaskStatus
from scheduler.context import SchedulerContext, TickReport
from scheduler.deals import DealListener

log = logging.getLogger(__name__)

T = TaskStatus


class Initializer:
    def __init__(self, ctx: SchedulerContext, deals: DealListener) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.deals = deals

    def initialize(self, report: TickReport) -> None:
        """Initialize pending tasks on chain in batches, earliest deadline first."""
        leftovers = self.store.tasks_in([T.INITIALIZING])
        for task in leftovers:  # a previous tick died mid-batch: ask the chain
            self._reconcile_initializing(task)
        batch_size = self.ctx.settings.init_batch_size
        # read the backlog once (earliest deadline first) and batch it here: re-querying it
        # per batch made initialization quadratic in the backlog (ops/bench, 10,000 tasks)
        pending = self.store.tasks_in(
            [T.RECEIVED],
            fields=("chainTaskId", "chainDealId", "index", "tag", "smsUrl", "waitingReason"),
        )
        # a TEE task is initialized only once the SMS of its framework says it runs it
        pending = self._tee_ready(pending, report)
        # nothing is sent for a deal a chain reorganisation removed (or moved: it waits until
        # the listener sees it at its new block)
        hold = self.deals.drop_vanished(dict.fromkeys(t["chainDealId"] for t in pending))
        if hold:
            pending = [t for t in pending if t["chainDealId"] not in hold]
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            for task in batch:
                self.store.transition_task(task["chainTaskId"], T.INITIALIZING)
            self._initialize_batch(batch, report)

    def _tee_ready(self, tasks: list[dict[str, Any]], report: TickReport) -> list[dict[str, Any]]:
        """``tasks`` without the TEE tasks that cannot be initialized now: those whose SMS
        runs another framework fail (INITIALIZE_FAILED, nothing sent, as iexec-core), those
        whose SMS does not answer wait (RECEIVED, with the reason) for a later tick."""
        tee = self.ctx.tee
        ready: list[dict[str, Any]] = []
        for task in tasks:
            framework = tee.framework(task.get("tag"))
            if framework is None:
                ready.append(task)
                continue
            taskid = task["chainTaskId"]
            runs, detail = tee.runs(framework)
            if runs:
                shown = redact_urls(detail)  # the task shows its SMS (no credentials)
                if task.get("smsUrl") != shown or task.get("waitingReason"):
                    fields = {"smsUrl": shown, "teeFramework": framework, "waitingReason": ""}
                    self.store.set_task_fields(taskid, fields)
                ready.append(task)
            elif runs is False:
                reason = redact_urls(f"TEE task not initialized: {detail}")
                self.store.transition_task(
                    taskid, T.INITIALIZE_FAILED, note=reason, extra={"failureReason": reason}
                )
                report.tasks_init_failed += 1
                log.error("task %s: %s", taskid, reason)
            else:
                reason = redact_urls(f"waiting: the SMS does not answer ({detail})")
                if task.get("waitingReason") != reason:
                    self.store.set_task_fields(taskid, {"waitingReason": reason})
        return ready

    def _reconcile_initializing(self, task: dict[str, Any]) -> None:
        onchain = self.client.view_task(task["chainTaskId"])
        if onchain.status != ChainTaskStatus.UNSET:
            self.store.transition_task(
                task["chainTaskId"], T.INITIALIZED, note="found initialized on chain"
            )
        else:
            self.store.transition_task(task["chainTaskId"], T.RECEIVED, note="retry")

    def _initialize_batch(self, batch: list[dict[str, Any]], report: TickReport) -> None:
        try:
            receipt = actions.initialize_array(
                self.ctx.wallet,
                [t["chainDealId"] for t in batch],
                [t["index"] for t in batch],
            )
        except TransactionReverted as exc:
            if len(batch) > 1:  # split to find the bad task(s)
                half = len(batch) // 2
                self._initialize_batch(batch[:half], report)
                self._initialize_batch(batch[half:], report)
                return
            self._initialize_failed(batch[0], exc, report)
            return
        report.init_transactions += 1
        for task in batch:
            self.store.transition_task(task["chainTaskId"], T.INITIALIZED, tx_hash=receipt.tx_hash)
            report.tasks_initialized += 1

    def _initialize_failed(
        self, task: dict[str, Any], exc: TransactionReverted, report: TickReport
    ) -> None:
        taskid = task["chainTaskId"]
        onchain = self.client.view_task(taskid)
        if onchain.status != ChainTaskStatus.UNSET:
            self.store.transition_task(taskid, T.INITIALIZED, note="initialized by someone else")
            return
        reason = redact_urls(exc.diagnosis or exc.reason or str(exc))
        self.store.transition_task(
            taskid, T.INITIALIZE_FAILED, note=reason, extra={"failureReason": reason}
        )
        report.tasks_init_failed += 1
        log.error("task %s cannot be initialized: %s", taskid, reason)
