"""The chain listener: SchedulerNotice events of this pool, each deal read from the chain
and stored with its tasks (or stored as skipped, with the reason)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from poco.consensus import replicates_needed
from poco.errors import FilterRefused, PocoError
from poco.proofs import task_id
from poco.tags import TAG_BITS, decode_tag, is_tee, tag_to_int, tee_framework
from poco.types import Category, Deal
from pool.messages import queue_for_tag
from pool.states import DealStatus, TaskStatus
from scheduler.context import SchedulerContext, TickReport

log = logging.getLogger(__name__)

CONTRIBUTION_DEADLINE_RATIO = 7
FINAL_DEADLINE_RATIO = 10
# the trusts a TEE deal may have (iexec-core's CORRECT_TEE_TRUSTS)
TEE_TRUSTS = (0, 1)
# a node that refused a block filter is asked for one again after this many seconds (it may
# have been restarted, or the request may have reached another node of a provider)
FILTER_RETRY = 600.0


class BlockWatch:
    """When the chain has a new block, for the listen to react to it.

    Where the node keeps a block filter (``eth_newBlockFilter``), each look is one
    ``eth_getFilterChanges`` that answers the blocks added since the last look, and the
    listen runs only when there is one. Where it refuses filters (some providers and load
    balancers do), or forgets the filter and refuses a new one, each look reads the head
    (``eth_blockNumber``) and compares it with the last one seen: polling, as before. The
    filter is asked for again :data:`FILTER_RETRY` seconds after a refusal.

    One thread looks at a time (the listen's own)."""

    def __init__(self, client: Any, period: float) -> None:
        self.client = client
        self.period = period
        self.filter_id: str | None = None
        self.refused_at: float | None = None  # monotonic time of the last refusal
        self.head: int | None = None  # polling: the last head seen
        self.mode = "unknown"  # "filter" or "poll" once the node answered

    def look(self) -> bool:
        """One look at the node: True when a block came since the last look (or when it
        cannot tell, e.g. a filter it forgot: the listen then reads the head itself)."""
        if self.filter_id is None and self._may_ask_filter():
            try:
                self.filter_id = self.client.new_block_filter()
            except FilterRefused as exc:
                self.refused_at = time.monotonic()
                if self.mode != "poll":
                    log.info("no block filter on the chain node (%s): polling the head", exc)
                self.mode = "poll"
            else:
                self.mode = "filter"
                return True  # blocks may have come before the filter: one listen reads them
        if self.filter_id is not None:
            try:
                return bool(self.client.block_filter_changes(self.filter_id))
            except FilterRefused as exc:
                log.info("the chain node forgot its block filter (%s): a new one", exc)
                self.filter_id = None
                return True
        head = self.client.block_number()
        moved = self.head is None or head != self.head
        self.head = head
        return moved

    def wait(self, stop: threading.Event, timeout: float) -> bool:
        """Look every ``period`` seconds (the first look one period from now: the caller
        has just listened) until a block comes (True) or ``timeout`` seconds have passed or
        ``stop`` is set (False). A node that does not answer is looked at again at the next
        period."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or stop.wait(min(self.period, left)):
                return False
            try:
                if self.look():
                    return True
            except PocoError as exc:
                log.warning("looking for new blocks: %s", exc)

    def close(self) -> None:
        """Let the node forget the filter (best effort)."""
        if self.filter_id is not None:
            with contextlib.suppress(PocoError):
                self.client.uninstall_filter(self.filter_id)
            self.filter_id = None

    def _may_ask_filter(self) -> bool:
        refused = self.refused_at
        return refused is None or time.monotonic() - refused >= FILTER_RETRY


class DealListener:
    def __init__(self, ctx: SchedulerContext) -> None:
        self.ctx = ctx
        self.store = ctx.store
        self.client = ctx.client
        self.cursor_name = f"SchedulerNotice:{ctx.pool.lower()}"
        self._categories: dict[int, Category] = {}
        supported = 0
        for name in ctx.settings.served_tag_bits():
            supported |= 1 << TAG_BITS[name]
        self.supported_tag_bits = supported

    def next_block(self) -> int:
        """The first block the listener has not read yet."""
        cursor = self.store.get_cursor(self.cursor_name)
        return self.ctx.settings.start_block if cursor is None else cursor + 1

    def listen(self, report: TickReport, head: int | None = None) -> None:
        """Read SchedulerNotice logs for our pool up to head - confirmations (``head``: that
        block, when the caller has just read it), from WORKERPOOL_REORG_WINDOW blocks below
        the cursor: a chain reorganisation may have replaced blocks already read, with a deal
        in another block or a new one. A deal already stored is not stored again."""
        settings = self.ctx.settings
        start = self.next_block()
        if head is None:
            head = self.client.block_number() - self.ctx.confirmations
        report.head = head
        if start > settings.start_block:  # blocks were read before: read the last ones again
            start = max(settings.start_block, start - settings.reorg_window)
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
        stored = self.store.deal_location(dealid)
        if stored is not None:
            known = stored.get("blockHash")
            same = known is None or known == _block_hash(entry)
            if same and stored["status"] != DealStatus.REORGED:
                return  # stored by an earlier (maybe interrupted) poll or another scheduler
            # its notice is in another block now (a reorganisation moved it), or back after
            # one removed it
            self._seen_again(dealid, stored, entry, report)
            return
        doc, tasks, reason = self._read(dealid, entry, fresh=False)
        if self.store.save_deal(doc, tasks):
            if reason:
                report.deals_skipped += 1
            else:
                report.deals_new += 1
                log.info("deal %s stored with %d task(s)", dealid, len(tasks))

    def _read(
        self, dealid: str, entry: Any, *, fresh: bool
    ) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
        """The deal's document and tasks from the chain, or its skip reason."""
        deal = self.client.view_deal(dealid, fresh=fresh)
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
        return doc, tasks, reason

    def _seen_again(
        self, dealid: str, stored: dict[str, Any], entry: Any, report: TickReport
    ) -> None:
        """The deal's notice is at another block than the one stored: read the deal again
        (a re-mined deal starts at its new block's time) and store it with its tasks, unless
        something was already sent for it."""
        block = int(entry["blockNumber"])
        if stored["status"] != DealStatus.REORGED:
            note = f"moved by a chain reorganisation from block {stored.get('blockNumber')}"
            if not self.store.drop_reorged_deal(dealid, note):
                log.warning(
                    "deal %s moved from block %s to %d by a chain reorganisation after tasks "
                    "were initialized: the chain decides what happens to them",
                    dealid,
                    stored.get("blockNumber"),
                    block,
                )
                return
        if not self.client.view_deal(dealid, fresh=True).exists:
            return  # the node answers from another fork: look again next poll
        doc, tasks, reason = self._read(dealid, entry, fresh=False)
        if self.store.revive_deal(doc, tasks):
            log.info(
                "deal %s seen again at block %d: stored with %d task(s)", dealid, block, len(tasks)
            )
            if reason:
                report.deals_skipped += 1
            else:
                report.deals_new += 1

    def drop_vanished(self, dealids: Iterable[str]) -> set[str]:
        """Before anything is sent for these deals: those whose SchedulerNotice block is no
        longer on the chain, and which the chain no longer has, are dropped (REORGED, their
        tasks deleted); those the chain has at another block wait until the listener sees
        them there. Returns the deals not to initialize now."""
        hold: set[str] = set()
        hashes: dict[int, str | None] = {}
        for dealid in dealids:
            stored = self.store.deal_location(dealid)
            if stored is None or stored.get("blockHash") is None:
                continue
            block = int(stored["blockNumber"])
            if block not in hashes:
                hashes[block] = self.client.block_hash(block)
            if hashes[block] == stored["blockHash"]:
                continue
            hold.add(dealid)
            if self.client.view_deal(dealid, fresh=True).exists:
                log.info(
                    "deal %s is no longer at block %d (chain reorganisation): waiting to see it "
                    "at its new block",
                    dealid,
                    block,
                )
                continue
            if self.store.drop_reorged_deal(
                dealid, f"block {block} left the chain and the deal with it (reorganisation)"
            ):
                log.warning(
                    "deal %s vanished in a chain reorganisation (block %d): dropped, nothing "
                    "was sent for it",
                    dealid,
                    block,
                )
        return hold

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
        framework = tee_framework(deal.tag) if is_tee(deal.tag) else None
        if is_tee(deal.tag) and framework is None:
            return "tag has the TEE bit without exactly one framework (scone, gramine or tdx)"
        if framework is not None:
            if deal.trust not in TEE_TRUSTS:  # iexec-core's DealWatcherService
                return (
                    f"a TEE deal must have trust 0 or 1, this one has {deal.trust} (iexec-core "
                    "refuses it too: an enclave result needs no replication)"
                )
            if framework not in settings.tee_stack:
                return (
                    f"tag asks for a {framework} enclave, which this pool does not run "
                    "(WORKERPOOL_TEE_STACK)"
                )
        final_deadline = deal.start_time + FINAL_DEADLINE_RATIO * category.work_clock_time_ref
        now = self.client.block_timestamp()
        if final_deadline <= now:
            return f"final deadline {final_deadline} already passed (chain time {now})"
        return ""


def _block_hash(entry: Any) -> str:
    return "0x" + bytes(entry["blockHash"]).hex()


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
        "blockHash": _block_hash(entry),
        "txHash": "0x" + bytes(entry["transactionHash"]).hex(),
        "seenAt": time.time(),
    }


def _task_docs(deal: Deal, category: Category, queue: str) -> list[dict[str, Any]]:
    timeref = category.work_clock_time_ref
    # the deal's values, computed once: its tasks share them (one object per deal in this
    # process, not one per task: the embedded store keeps what it is given)
    status = str(TaskStatus.RECEIVED)
    contribution_deadline = deal.start_time + CONTRIBUTION_DEADLINE_RATIO * timeref
    final_deadline = deal.start_time + FINAL_DEADLINE_RATIO * timeref
    needed = replicates_needed(deal.trust)
    return [
        {
            "chainTaskId": task_id(deal.dealid, idx),
            "chainDealId": deal.dealid,
            "index": idx,
            "status": status,
            "trust": deal.trust,
            "tag": deal.tag,
            "queue": queue,
            "category": deal.category,
            "timeref": timeref,
            "contributionDeadline": contribution_deadline,
            "finalDeadline": final_deadline,
            "jobsQueued": 0,
            "replicatesNeeded": needed,
            "replicatesGranted": 0,
        }
        for idx in range(deal.bot_first, deal.bot_first + deal.bot_size)
    ]
