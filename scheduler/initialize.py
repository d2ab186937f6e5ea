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

# tasks read at once from the backlog (rounded to whole batches)
PAGE = 1000


class Initializer:
    def __init__(self, ctx: SchedulerContext, deals: DealListener) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.deals = deals

    def initialize(self, report: TickReport) -> None:
        """Initialize pending tasks on chain in batches, earliest deadline first."""
        leftovers = self.store.tasks_in([T.INITIALIZING], fields=("chainTaskId",), ordered=False)
        for task in leftovers:  # a previous tick died mid-batch: ask the chain
            self._reconcile_initializing(task)
        batch_size = self.ctx.settings.init_batch_size
        # the backlog is read a page at a time in the order it is initialized (an index
        # serves it: a page costs its size, and the memory does not grow with the backlog)
        page_size = batch_size * max(1, PAGE // batch_size)
        hold: set[str] = set()
        checked: set[str] = set()
        waiting: set[str] = set()  # TEE tasks whose SMS does not answer: left for a later tick
        while True:
            pending = self.store.tasks_page(
                T.RECEIVED,
                page_size,
                fields=("chainDealId", "index", "tag", "smsUrl", "waitingReason"),
                skip_deals=hold,
                skip_tasks=waiting,
            )
            if not pending:
                return
            # a TEE task is initialized only once the SMS of its framework says it runs it
            pending = self._tee_ready(pending, report, waiting)
            # nothing is sent for a deal a chain reorganisation removed (or moved: it waits
            # until the listener sees it at its new block)
            deals = {t["chainDealId"] for t in pending} - checked
            hold |= self.deals.drop_vanished(deals)
            checked |= deals
            pending = [t for t in pending if t["chainDealId"] not in hold]
            sent = 0
            for start in range(0, len(pending), batch_size):
                batch = pending[start : start + batch_size]
                sent += self.store.transition_tasks(
                    [t["chainTaskId"] for t in batch], T.INITIALIZING
                )
                self._initialize_batch(batch, report)
            if pending and not sent:
                return  # none of them moved (another scheduler's?): nothing more here

    def _tee_ready(
        self, tasks: list[dict[str, Any]], report: TickReport, waiting: set[str]
    ) -> list[dict[str, Any]]:
        """``tasks`` without the TEE tasks that cannot be initialized now: those whose SMS
        runs another framework fail (INITIALIZE_FAILED, nothing sent, as iexec-core), those
        whose SMS does not answer wait (RECEIVED, with the reason) for a later tick (added to
        ``waiting``: the next pages of this tick leave them out)."""
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
                waiting.add(taskid)
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
        report.tasks_initialized += self.store.transition_tasks(
            [t["chainTaskId"] for t in batch], T.INITIALIZED, tx_hash=receipt.tx_hash
        )

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
