"""The scheduler: its parts built on one :class:`~scheduler.context.SchedulerContext`, and
its schedules (the full tick and the fast listen).

One tick runs at a time across every scheduler process (a Redis lease); each step is
idempotent and reads its work from MongoDB, so a tick that dies half-way is finished by the
next one and two schedulers on one store duplicate nothing.

| part | module | what |
|---|---|---|
| ``deals`` | :mod:`scheduler.deals` | listen for deals, store them with their tasks |
| ``initializer`` | :mod:`scheduler.initialize` | initialize tasks on chain in batches |
| ``planner`` | :mod:`scheduler.planning` | queue replicate jobs, plan more, rebuild lost jobs |
| ``inbox`` | :mod:`scheduler.inbox` | check a worker's signed message, then hand it on |
| ``authorizer`` | :mod:`scheduler.authorization` | sign a worker's authorization |
| ``reports`` | :mod:`scheduler.reports` | apply a worker's report |
| ``consensus`` | :mod:`scheduler.consensus` | consensus, reveals, reopen, contribution timeout |
| ``finalizer`` | :mod:`scheduler.finalize` | upload, finalize, claim at the final deadline |
| ``fleet`` | :mod:`scheduler.fleet` | heartbeats, lost and paused workers |
| ``reconciler`` | :mod:`scheduler.reconcile` | every tick: the detectors, the chain as truth |
| ``replenisher`` | :mod:`orders.replenish` | keep the pool's capacity on sale |
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from orders.book import stake_coverage
from orders.replenish import Replenisher
from orders.store import OrderStore
from poco.errors import PocoError, RetryableError
from poco.funds import gas_check
from pool import keys
from pool.broker import redis_client
from pool.leases import Lease
from pool.messages import Messenger
from pool.settings import Settings
from pool.store import connect
from pool.wallets import checked_chain_client, scheduler_key
from scheduler.authorization import Authorizer
from scheduler.consensus import Consensus
from scheduler.context import SchedulerContext, TickReport
from scheduler.deals import DealListener
from scheduler.finalize import Finalizer
from scheduler.fleet import Fleet
from scheduler.inbox import Inbox
from scheduler.initialize import Initializer
from scheduler.planning import Planner
from scheduler.reconcile import Reconciler
from scheduler.reports import Reports

log = logging.getLogger(__name__)


def lock_ttl(settings: Settings) -> float:
    """Seconds the tick lock outlives its last renewal (renewed before each tick step)."""
    return max(10.0, settings.poll_period * 5)


class Scheduler:
    def __init__(self, ctx: SchedulerContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = ctx.store
        self.deals = DealListener(ctx)
        self.initializer = Initializer(ctx)
        self.planner = Planner(ctx)
        self.fleet = Fleet(ctx, self.planner)
        self.finalizer = Finalizer(ctx, self.fleet)
        self.consensus = Consensus(ctx, self.planner, self.finalizer)
        self.authorizer = Authorizer(ctx, self.fleet)
        self.reports = Reports(ctx, self.planner, self.fleet, self.consensus, self.finalizer)
        self.inbox = Inbox(ctx, self.authorizer, self.reports, self.fleet)
        self.reconciler = Reconciler(ctx, self.planner, self.fleet, self.consensus, self.finalizer)
        self.replenisher = Replenisher(ctx.settings, ctx.store, ctx.client, ctx.wallet)
        self._running = threading.Lock()  # a tick or a fast listen of this process

    # ---- the schedules ----------------------------------------------------------------------
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
                self.deals.listen,
                self.initializer.initialize,
                self.planner.plan,
                self.reconciler.reconcile,
                self.planner.requeue_lost_jobs,
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
        head = self.ctx.client.block_number() - self.settings.confirmations
        report.head = head
        if head < self.deals.next_block():
            return report  # no new block: nothing to read
        with self._exclusive() as renew:
            if renew is None:
                report.skipped_tick = True
                return report

            def listen(report: TickReport) -> None:
                self.deals.listen(report, head)

            steps = (listen, self.initializer.initialize, self.planner.plan)
            self._run_steps(steps, report, renew)
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
        if self.ctx.redis is None:
            yield lambda: True
            return
        ttl_ms = int(lock_ttl(self.settings) * 1000)
        lease = Lease.acquire(self.ctx.redis, keys.TICK_LOCK, ttl_ms)
        if lease is None:
            yield None
            return
        done = threading.Event()
        lost = threading.Event()

        def renewing() -> None:
            while not done.wait(ttl_ms / 3000):
                try:
                    if not lease.renew():
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
            with suppress(Exception):
                lease.release()


def funds_warnings(ctx: SchedulerContext) -> list[str]:
    """What the scheduler wallet lacks: gas for its next transactions (iexec-core stops when
    it has none; this scheduler says so and goes on, as deals already matched still need it),
    and free stake for the orders it has published (requesters could not buy them)."""
    warnings = []
    owner = ctx.wallet.address
    budget = int(ctx.settings.gas_price_budget_gwei * 10**9)
    gas = gas_check(ctx.client, owner, budget)
    if gas.low:
        warnings.append(f"scheduler wallet: {gas.describe(owner)}")
    stake = ctx.client.view_account(owner).stake
    coverage = stake_coverage(OrderStore(ctx.store.db), owner, stake)
    if not coverage.covered:
        warnings.append(coverage.warning())
    return warnings


def build(settings: Settings, messages: Messenger) -> Scheduler:
    """Wire a scheduler from settings: chain client, scheduler wallet (it must own the pool),
    store and Redis; it sends its messages with ``messages`` (the process's Celery app)."""
    settings.require("chain_rpc_url", "hub_address", "pool_address")
    client = checked_chain_client(settings)
    wallet = client.wallet(scheduler_key(settings))
    owner = client.workerpool_owner(str(settings.pool_address))
    if owner.lower() != wallet.address.lower():
        raise PocoError(
            f"the scheduler wallet {wallet.address} does not own POOL_ADDRESS "
            f"{settings.pool_address} (its owner is {owner})"
        )
    ctx = SchedulerContext(
        settings,
        connect(settings),
        client,
        wallet,
        messages,
        redis_client(settings),
    )
    scheduler = Scheduler(ctx)
    for warning in funds_warnings(ctx):
        log.warning("%s", warning)
    return scheduler
