"""The chain listener: SchedulerNotice events of this pool, each deal read from the chain
and stored with its tasks (or stored as skipped, with the reason)."""

from __future__ import annotations

import logging
import time
from typing import Any

from poco.consensus import replicates_needed
from poco.proofs import task_id
from poco.tags import TAG_BITS, decode_tag, tag_to_int
from poco.types import Category, Deal
from pool.messages import queue_for_tag
from pool.states import DealStatus, TaskStatus
from scheduler.context import SchedulerContext, TickReport

log = logging.getLogger(__name__)

CONTRIBUTION_DEADLINE_RATIO = 7
FINAL_DEADLINE_RATIO = 10


class DealListener:
    def __init__(self, ctx: SchedulerContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.cursor_name = f"SchedulerNotice:{ctx.pool.lower()}"
        self._categories: dict[int, Category] = {}
        supported = 0
        for name in ctx.settings.tag_bits:
            supported |= 1 << TAG_BITS[name]
        self.supported_tag_bits = supported

    def next_block(self) -> int:
        """The first block the listener has not read yet."""
        cursor = self.store.get_cursor(self.cursor_name)
        return self.ctx.settings.start_block if cursor is None else cursor + 1

    def listen(self, report: TickReport, head: int | None = None) -> None:
        """Read SchedulerNotice logs for our pool from the cursor up to head - confirmations
        (``head``: that block, when the caller has just read it)."""
        settings = self.ctx.settings
        start = self.next_block()
        if head is None:
            head = self.client.block_number() - settings.confirmations
        report.head = head
        if head < start:
            return
        step = settings.log_range
        for lo in range(start, head + 1, step):
            hi = min(lo + step - 1, head)
            for entry in self.client.get_logs(
                "SchedulerNotice", lo, hi, {"workerpool": self.ctx.pool}, chunk=step
            ):
                dealid = "0x" + bytes(entry["args"]["dealid"]).hex()
                self.accept_deal(dealid, entry, report)
            # only after every deal of the range is stored
            self.store.advance_cursor(self.cursor_name, hi)

    def accept_deal(self, dealid: str, entry: Any, report: TickReport) -> None:
        if self.store.deal(dealid) is not None:
            return  # stored by an earlier (maybe interrupted) poll or another scheduler
        deal = self.client.view_deal(dealid)
        category = self._category(deal.category)
        reason = self._skip_reason(deal, category)
        doc = _deal_doc(deal, category, entry)
        tasks: list[dict[str, Any]] = []
        if reason:
            doc.update(status=str(DealStatus.SKIPPED), skipReason=reason)
            log.info("deal %s skipped: %s", dealid, reason)
        else:
            doc["status"] = str(DealStatus.ACCEPTED)
            tasks = _task_docs(deal, category, doc["queue"])
        if self.store.save_deal(doc, tasks):
            if reason:
                report.deals_skipped += 1
            else:
                report.deals_new += 1
                log.info("deal %s stored with %d task(s)", dealid, len(tasks))

    def _category(self, category: int) -> Category:
        if category not in self._categories:
            self._categories[category] = self.client.view_category(category)
        return self._categories[category]

    def _skip_reason(self, deal: Deal, category: Category) -> str:
        settings = self.ctx.settings
        if settings.categories and deal.category not in settings.categories:
            served = ", ".join(str(c) for c in settings.categories)
            return f"category {deal.category} ({category.name}) is not served (serves {served})"
        unsupported = tag_to_int(deal.tag) & ~self.supported_tag_bits
        if unsupported:
            return f"tag needs {', '.join(decode_tag(unsupported))}, which this pool does not serve"
        final_deadline = deal.start_time + FINAL_DEADLINE_RATIO * category.work_clock_time_ref
        now = self.client.block_timestamp()
        if final_deadline <= now:
            return f"final deadline {final_deadline} already passed (chain time {now})"
        return ""


def _deal_doc(deal: Deal, category: Category, entry: Any) -> dict[str, Any]:
    return {
        "chainDealId": deal.dealid,
        "app": deal.app.pointer,
        "appOwner": deal.app.owner,
        "appPrice": deal.app.price,
        "dataset": deal.dataset.pointer,
        "datasetPrice": deal.dataset.price,
        "workerpool": deal.workerpool.pointer,
        "workerpoolPrice": deal.workerpool.price,
        "requester": deal.requester,
        "beneficiary": deal.beneficiary,
        "callback": deal.callback,
        "params": deal.params,
        "tag": deal.tag,
        "trust": deal.trust,
        "category": deal.category,
        "timeref": category.work_clock_time_ref,
        "startTime": deal.start_time,
        "botFirst": deal.bot_first,
        "botSize": deal.bot_size,
        "workerStake": deal.worker_stake,
        "queue": queue_for_tag(deal.tag),
        "blockNumber": int(entry["blockNumber"]),
        "txHash": "0x" + bytes(entry["transactionHash"]).hex(),
        "seenAt": time.time(),
    }


def _task_docs(deal: Deal, category: Category, queue: str) -> list[dict[str, Any]]:
    timeref = category.work_clock_time_ref
    return [
        {
            "chainTaskId": task_id(deal.dealid, idx),
            "chainDealId": deal.dealid,
            "index": idx,
            "status": str(TaskStatus.RECEIVED),
            "trust": deal.trust,
            "tag": deal.tag,
            "queue": queue,
            "category": deal.category,
            "timeref": timeref,
            "contributionDeadline": deal.start_time + CONTRIBUTION_DEADLINE_RATIO * timeref,
            "finalDeadline": deal.start_time + FINAL_DEADLINE_RATIO * timeref,
            "jobsQueued": 0,
            "replicatesNeeded": replicates_needed(deal.trust),
            "replicatesGranted": 0,
        }
        for idx in range(deal.bot_first, deal.bot_first + deal.bot_size)
    ]
