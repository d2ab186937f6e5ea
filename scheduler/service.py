"""The scheduler's tick: listen for deals, initialize their tasks, plan replicate jobs.

One tick runs at a time across every scheduler process (a Redis lock); each step is
idempotent and reads its work from MongoDB, so a tick that dies half-way is finished by the
next one and two schedulers on one store duplicate nothing.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from poco import actions
from poco.chain import ChainClient, Wallet
from poco.consensus import replicates_needed
from poco.errors import PocoError, RetryableError, TransactionReverted
from poco.proofs import task_id
from poco.tags import TAG_BITS, decode_tag, tag_to_int
from poco.types import Category, ChainTaskStatus, Deal
from pool.celery_app import REPLICATE_TASK, queue_for_tag
from pool.settings import Settings
from pool.states import DealStatus, TaskStatus
from pool.store import Store
from scheduler.lifecycle import Lifecycle
from scheduler.replenish import Replenisher

log = logging.getLogger(__name__)

CONTRIBUTION_DEADLINE_RATIO = 7
FINAL_DEADLINE_RATIO = 10
TICK_LOCK = "workerpool:scheduler:tick"
# compare-and-expire / compare-and-delete: only the holder's token renews or frees the lock
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


def lock_ttl(settings: Settings) -> float:
    """Seconds the tick lock outlives its last renewal (renewed before each tick step)."""
    return max(10.0, settings.poll_period * 5)


@dataclass
class TickReport:
    deals_new: int = 0
    deals_skipped: int = 0
    tasks_initialized: int = 0
    init_transactions: int = 0
    tasks_init_failed: int = 0
    jobs_enqueued: int = 0
    tasks_claimed: int = 0
    head: int | None = None
    skipped_tick: bool = False
    errors: list[str] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: ChainClient,
        wallet: Wallet,
        celery: Celery,
        redis: Any = None,
    ) -> None:
        settings.require("pool_address")
        self.settings = settings
        self.store = store
        self.client = client
        self.wallet = wallet
        self.celery = celery
        self.redis = redis
        self.pool = str(settings.pool_address)
        self.cursor_name = f"SchedulerNotice:{self.pool.lower()}"
        self._categories: dict[int, Category] = {}
        supported = 0
        for name in settings.tag_bits:
            supported |= 1 << TAG_BITS[name]
        self.supported_tag_bits = supported
        self.lifecycle = Lifecycle(self)
        self._running = threading.Lock()  # a tick or a fast listen of this process
        self.replenisher = Replenisher.from_scheduler(self)

    # ---- the tick -----------------------------------------------------------------------
    def tick(self) -> TickReport:
        """The full tick (every WORKERPOOL_POLL_PERIOD): listen, initialize, plan, reconcile
        with the chain, requeue lost jobs, replenish the orderbook. When a fast listen holds
        the lock, it waits for it a little rather than skip a whole period."""
        report = TickReport()
        wait = min(self.settings.poll_period, 5.0) if self.settings.listen_period else 0.0
        with self._exclusive(wait) as renew:
            if renew is None:
                report.skipped_tick = True
                return report
            steps = (
                self.listen,
                self.initialize,
                self.plan,
                self.lifecycle.reconcile,
                self.requeue_lost_jobs,
                self.replenisher.replenish,
            )
            self._run_steps(steps, report, renew)
        return report

    def listen_tick(self) -> TickReport:
        """The fast schedule beside the tick (every WORKERPOOL_LISTEN_PERIOD), so that a new
        deal does not wait for the next full tick: one ``eth_blockNumber``, and only when the
        chain moved past the cursor, the tick's first steps (listen, initialize, plan). It
        shares the tick lock and never waits for it: while a tick runs, that tick listens."""
        report = TickReport()
        head = self.client.block_number() - self.settings.confirmations
        report.head = head
        cursor = self.store.get_cursor(self.cursor_name)
        if head < (self.settings.start_block if cursor is None else cursor + 1):
            return report  # no new block: nothing to read
        with self._exclusive() as renew:
            if renew is None:
                report.skipped_tick = True
                return report

            def listen(report: TickReport) -> None:
                self.listen(report, head)

            self._run_steps((listen, self.initialize, self.plan), report, renew)
        return report

    def loop(
        self, stop: threading.Event, on_report: Callable[[TickReport], None] | None = None
    ) -> None:
        """Run the schedules until ``stop`` is set, on this thread (``workerpool standalone``):
        a full tick every poll period and, in between, a fast listen every listen period.
        One thread, so here the two never overlap; ``on_report`` sees every report."""
        period = self.settings.poll_period
        fast = self.settings.listen_period
        next_tick = time.monotonic()
        while not stop.is_set():
            full = time.monotonic() >= next_tick
            run = self.tick if full else self.listen_tick
            try:
                report = run()
                if on_report is not None:
                    on_report(report)
            except Exception:
                log.exception("%s failed", run.__name__)
            now = time.monotonic()
            if full:
                next_tick = now + period
            wake = min(next_tick, now + fast) if fast else next_tick
            stop.wait(max(0.0, wake - now))

    def _run_steps(
        self,
        steps: Sequence[Callable[[TickReport], object]],
        report: TickReport,
        renew: Callable[[], bool],
    ) -> None:
        for step in steps:
            name = step.__name__
            if not renew():  # expired while Redis was away: another tick may run now
                report.errors.append(f"tick lock lost before {name}")
                log.warning("tick lock lost before %s: stopping this tick", name)
                break
            try:
                step(report)
            except RetryableError as exc:  # the next tick picks up where this one stopped
                log.warning("%s: %s (will retry next tick)", name, exc)
                report.errors.append(f"{name}: {exc}")
            except PocoError as exc:
                log.error("%s: %s", name, exc)
                report.errors.append(f"{name}: {exc}")

    @contextmanager
    def _exclusive(self, wait: float = 0.0) -> Iterator[Callable[[], bool] | None]:
        """The tick lock (:meth:`_lock`, across schedulers) and this process's own (also
        without Redis): the full tick and the fast listen never run at once. Yields as
        :meth:`_lock` does; ``wait`` is how long to keep trying for it."""
        deadline = time.monotonic() + wait
        while True:
            if self._running.acquire(blocking=False):
                try:
                    with self._lock() as renew:
                        if renew is not None or time.monotonic() >= deadline:
                            yield renew
                            return
                finally:
                    self._running.release()
            elif time.monotonic() >= deadline:
                yield None
                return
            time.sleep(0.05)

    @contextmanager
    def _lock(self) -> Iterator[Callable[[], bool] | None]:
        """The tick lock: yields a function that says whether the lock is still ours, or None
        when another scheduler holds it. A thread renews it every third of ``lock_ttl`` while
        the tick runs, so a killed scheduler blocks the others for seconds, not minutes, and
        a long step does not lose it."""
        if self.redis is None:
            yield lambda: True
            return
        token = uuid.uuid4().hex
        ttl_ms = int(lock_ttl(self.settings) * 1000)
        if not self.redis.set(TICK_LOCK, token, nx=True, px=ttl_ms):
            yield None
            return
        done = threading.Event()
        lost = threading.Event()

        def renewing() -> None:
            while not done.wait(ttl_ms / 3000):
                try:
                    if not self.redis.eval(_RENEW, 1, TICK_LOCK, token, ttl_ms):
                        lost.set()
                        return
                except Exception as exc:  # Redis down: the lock expires, the tick goes on
                    log.warning("tick lock renewal failed: %s", exc)

        renewer = threading.Thread(target=renewing, daemon=True, name="tick-lock")
        renewer.start()
        try:
            yield lambda: not lost.is_set()
        finally:
            done.set()
            renewer.join()
            with contextlib.suppress(Exception):
                self.redis.eval(_RELEASE, 1, TICK_LOCK, token)

    # ---- 1. listen ------------------------------------------------------------------------
    def listen(self, report: TickReport, head: int | None = None) -> None:
        """Read SchedulerNotice logs for our pool from the cursor up to head - confirmations
        (``head``: that block, when the caller has just read it)."""
        cursor = self.store.get_cursor(self.cursor_name)
        start = self.settings.start_block if cursor is None else cursor + 1
        if head is None:
            head = self.client.block_number() - self.settings.confirmations
        report.head = head
        if head < start:
            return
        step = self.settings.log_range
        for lo in range(start, head + 1, step):
            hi = min(lo + step - 1, head)
            for entry in self.client.get_logs(
                "SchedulerNotice", lo, hi, {"workerpool": self.pool}, chunk=step
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
        if self.settings.categories and deal.category not in self.settings.categories:
            served = ", ".join(str(c) for c in self.settings.categories)
            return f"category {deal.category} ({category.name}) is not served (serves {served})"
        unsupported = tag_to_int(deal.tag) & ~self.supported_tag_bits
        if unsupported:
            return f"tag needs {', '.join(decode_tag(unsupported))}, which this pool does not serve"
        final_deadline = deal.start_time + FINAL_DEADLINE_RATIO * category.work_clock_time_ref
        now = self.client.block_timestamp()
        if final_deadline <= now:
            return f"final deadline {final_deadline} already passed (chain time {now})"
        return ""

    # ---- 2. initialize ----------------------------------------------------------------------
    def initialize(self, report: TickReport) -> None:
        """Initialize pending tasks on chain in batches, earliest deadline first."""
        leftovers = self.store.tasks_in([TaskStatus.INITIALIZING])
        for task in leftovers:  # a previous tick died mid-batch: ask the chain
            self._reconcile_initializing(task)
        batch_size = self.settings.init_batch_size
        # read the backlog once (earliest deadline first) and batch it here: re-querying it
        # per batch made initialization quadratic in the backlog (ops/bench, 10,000 tasks)
        pending = self.store.tasks_in(
            [TaskStatus.RECEIVED], fields=("chainTaskId", "chainDealId", "index")
        )
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            for task in batch:
                self.store.transition_task(task["chainTaskId"], TaskStatus.INITIALIZING)
            self._initialize_batch(batch, report)

    def _reconcile_initializing(self, task: dict[str, Any]) -> None:
        onchain = self.client.view_task(task["chainTaskId"])
        if onchain.status != ChainTaskStatus.UNSET:
            self.store.transition_task(
                task["chainTaskId"], TaskStatus.INITIALIZED, note="found initialized on chain"
            )
        else:
            self.store.transition_task(task["chainTaskId"], TaskStatus.RECEIVED, note="retry")

    def _initialize_batch(self, batch: list[dict[str, Any]], report: TickReport) -> None:
        try:
            receipt = actions.initialize_array(
                self.wallet,
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
            self.store.transition_task(
                task["chainTaskId"], TaskStatus.INITIALIZED, tx_hash=receipt.tx_hash
            )
            report.tasks_initialized += 1

    def _initialize_failed(
        self, task: dict[str, Any], exc: TransactionReverted, report: TickReport
    ) -> None:
        taskid = task["chainTaskId"]
        onchain = self.client.view_task(taskid)
        if onchain.status != ChainTaskStatus.UNSET:
            self.store.transition_task(
                taskid, TaskStatus.INITIALIZED, note="initialized by someone else"
            )
            return
        reason = exc.diagnosis or exc.reason or str(exc)
        self.store.transition_task(
            taskid, TaskStatus.INITIALIZE_FAILED, note=reason, extra={"failureReason": reason}
        )
        report.tasks_init_failed += 1
        log.error("task %s cannot be initialized: %s", taskid, reason)

    # ---- 3. plan ------------------------------------------------------------------------------
    def plan(self, report: TickReport) -> None:
        """Enqueue the replicate jobs each initialized task needs for its trust."""
        for task in self.store.tasks_in([TaskStatus.INITIALIZED]):
            needed = task["replicatesNeeded"]
            # record the jobs first: a crash after this loses queued jobs, which recovery
            # rebuilds from Mongo, but never enqueues twice
            doc = self.store.transition_task(
                task["chainTaskId"], TaskStatus.RUNNING, inc={"jobsQueued": needed}
            )
            for _ in range(needed):
                self.enqueue(doc)
                report.jobs_enqueued += 1

    def enqueue(self, task: dict[str, Any]) -> None:
        self.celery.send_task(
            REPLICATE_TASK,
            args=[task["chainTaskId"]],
            kwargs={"deadline": task["contributionDeadline"]},
            queue=task["queue"],
        )
        self.store.set_task_fields(task["chainTaskId"], {"enqueuedAt": time.time()})

    def requeue_lost_jobs(self, report: TickReport) -> int:
        """Rebuild replicate jobs that Redis lost (a restart without persistence): a task
        still owed jobs (needed > granted) whose queue has been empty for a while gets them
        again. A duplicate is harmless: the authorization refuses what a task does not need."""
        if self.redis is None:
            return 0
        grace = max(30.0, 10 * self.settings.poll_period)
        now = time.time()
        empty: dict[str, bool] = {}
        added = 0
        running = self.store.tasks_in(
            [TaskStatus.RUNNING, TaskStatus.REOPENED],
            fields=(
                "chainTaskId",
                "queue",
                "contributionDeadline",
                "replicatesNeeded",
                "replicatesGranted",
                "enqueuedAt",
            ),
            ordered=False,
        )
        for task in running:
            owed = task.get("replicatesNeeded", 0) - task.get("replicatesGranted", 0)
            if owed <= 0 or now - task.get("enqueuedAt", now) < grace:
                continue
            queue = task["queue"]
            if queue not in empty:
                empty[queue] = int(self.redis.llen(queue)) == 0
            if not empty[queue]:
                continue
            log.warning(
                "task %s: %d job(s) missing from %s; queued again", task["chainTaskId"], owed, queue
            )
            for _ in range(owed):
                self.enqueue(task)
            added += owed
        report.jobs_enqueued += added
        return added


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


def build(settings: Settings) -> Scheduler:
    """Wire a scheduler from settings: chain client, scheduler wallet, store, Celery, Redis."""
    import redis

    from pool.celery_app import make_celery
    from pool.store import connect
    from pool.wallets import chain_client, scheduler_key

    settings.require("chain_rpc_url", "hub_address", "pool_address")
    client = chain_client(settings)
    if settings.chain_id and client.chain_id != settings.chain_id:
        raise PocoError(
            f"IEXEC_CHAIN_ID={settings.chain_id} but the node at "
            f"{settings.chain_rpc_url} reports chain {client.chain_id}"
        )
    wallet = client.wallet(scheduler_key(settings))
    owner = client.workerpool_owner(str(settings.pool_address))
    if owner.lower() != wallet.address.lower():
        raise PocoError(
            f"the scheduler wallet {wallet.address} does not own POOL_ADDRESS "
            f"{settings.pool_address} (its owner is {owner})"
        )
    return Scheduler(
        settings,
        connect(settings),
        client,
        wallet,
        make_celery(settings),
        redis.Redis.from_url(settings.redis_url),
    )
