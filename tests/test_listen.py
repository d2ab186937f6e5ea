"""The fast listen beside the full tick (WORKERPOOL_LISTEN_PERIOD, docs/performance.md hot spot
4), on fakes: the beat and the standalone loop run it between ticks, it reads nothing but the
head while the chain does not move, and it never runs at the same time as a tick of the same
scheduler. The devnet side (a deal picked up without a full tick) is in test_scheduler.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from pool.messages import LISTEN_TASK, SCHEDULER_QUEUE, TICK_TASK, make_celery
from pool.settings import Settings
from scheduler.context import SchedulerContext, TickReport
from scheduler.service import Scheduler
from scheduler.tasks import register
from testing.celery import fake_messenger
from testing.chain import FakeChain, FakeWallet
from testing.store import memory_store

POOL = "0x" + "11" * 20


def fake_chain() -> FakeChain:
    """A chain whose head the test moves; no SchedulerNotice ever."""
    return FakeChain(head=100, now=1_000_000)


def make(chain: FakeChain, **overrides: Any) -> Scheduler:
    settings = Settings(
        pool_address=POOL,
        chain_rpc_url="http://fake",
        hub_address=POOL,
        start_block=50,
        **overrides,
    )
    messages, _ = fake_messenger()
    wallet = FakeWallet(chain)
    ctx = SchedulerContext(settings, memory_store("workerpool-listen"), chain, wallet, messages)  # type: ignore[arg-type]
    return Scheduler(ctx)


def test_the_beat_runs_the_listen_between_ticks_and_not_when_turned_off() -> None:
    app = make_celery(Settings(pool_address=POOL))
    register(app, make(fake_chain(), listen_period=0.5, poll_period=2.0))
    beat = app.conf.beat_schedule
    assert beat["scheduler-tick"]["task"] == TICK_TASK
    assert beat["scheduler-listen"]["task"] == LISTEN_TASK
    assert beat["scheduler-listen"]["schedule"] == 0.5
    assert beat["scheduler-listen"]["options"]["queue"] == SCHEDULER_QUEUE
    assert LISTEN_TASK in app.tasks
    assert app.conf.task_routes[LISTEN_TASK] == {"queue": SCHEDULER_QUEUE}

    off = make_celery(Settings(pool_address=POOL))
    register(off, make(fake_chain(), listen_period=0))
    assert "scheduler-listen" not in off.conf.beat_schedule


def test_a_listen_reads_only_the_head_while_the_chain_does_not_move() -> None:
    chain = fake_chain()
    scheduler = make(chain)
    # the first listen reads the logs up to the head (and moves the cursor there)
    first = scheduler.listen_tick()
    assert not first.skipped_tick and first.head == 100
    assert chain.calls == Counter({"eth_blockNumber": 1, "eth_getLogs": 1})
    assert scheduler.store.get_cursor(scheduler.deals.cursor_name) == 100

    # while no block comes, a listen is one eth_blockNumber and nothing else
    chain.calls.clear()
    for _ in range(5):
        scheduler.listen_tick()
    assert chain.calls == Counter({"eth_blockNumber": 5})

    # a new block: its logs are read (and the head not asked twice)
    chain.head = 101
    chain.calls.clear()
    scheduler.listen_tick()
    assert chain.calls == Counter({"eth_blockNumber": 1, "eth_getLogs": 1})
    assert scheduler.store.get_cursor(scheduler.deals.cursor_name) == 101


def test_a_listen_never_runs_inside_a_tick_and_a_tick_waits_for_a_listen() -> None:
    chain = fake_chain()
    scheduler = make(chain, listen_period=0.5, poll_period=1.0)
    inside = threading.Event()
    release = threading.Event()
    running: list[str] = []

    def slow_reconcile(report: TickReport) -> None:
        running.append("tick")
        inside.set()
        release.wait(10)

    scheduler.reconciler.reconcile = slow_reconcile  # type: ignore[method-assign]
    # Given a full tick in the middle of its reconcile step
    ticking = threading.Thread(target=scheduler.tick)
    ticking.start()
    assert inside.wait(10)
    # When a listen comes (with a new block to read)
    chain.head = 200
    report = scheduler.listen_tick()
    # Then it steps aside: the running tick listens
    assert report.skipped_tick
    release.set()
    ticking.join(10)

    # Given a listen in the middle of its initialize step
    inside.clear()
    release.clear()

    def slow_initialize(report: TickReport) -> None:
        running.append("listen")
        inside.set()
        release.wait(10)

    scheduler.initializer.initialize = slow_initialize  # type: ignore[method-assign]
    chain.head = 300
    listening = threading.Thread(target=scheduler.listen_tick)
    listening.start()
    assert inside.wait(10)
    # When the full tick is due, it waits for the listen instead of skipping its period
    box: dict[str, TickReport] = {}
    ticking = threading.Thread(target=lambda: box.update(report=scheduler.tick()))
    ticking.start()
    time.sleep(0.3)
    assert ticking.is_alive() and "report" not in box
    release.set()
    listening.join(10)
    ticking.join(10)
    assert not box["report"].skipped_tick


def test_the_standalone_loop_listens_between_two_full_ticks() -> None:
    chain = fake_chain()
    scheduler = make(chain, poll_period=0.4, listen_period=0.05)
    runs: Counter[str] = Counter()
    scheduler.tick = lambda: runs.update(["tick"]) or TickReport()  # type: ignore[method-assign]
    scheduler.listen_tick = lambda: runs.update(["listen"]) or TickReport()  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.loop, args=(stop,))
    loop.start()
    time.sleep(1.0)
    stop.set()
    loop.join(5)
    assert not loop.is_alive()
    # a full tick at start and every 0.4 s; listens every 0.05 s in between
    assert 2 <= runs["tick"] <= 4, runs
    assert runs["listen"] >= 3 * runs["tick"], runs


@pytest.mark.parametrize("period", ["0"])
def test_listen_period_zero_turns_the_fast_listen_off_in_the_loop(period: str) -> None:
    chain = fake_chain()
    settings = Settings.from_env(
        {"POOL_ADDRESS": POOL, "WORKERPOOL_LISTEN_PERIOD": period, "WORKERPOOL_POLL_PERIOD": "0.2"}
    )
    assert settings.listen_period == 0
    scheduler = make(chain, poll_period=0.2, listen_period=0)
    runs: Counter[str] = Counter()
    scheduler.tick = lambda: runs.update(["tick"]) or TickReport()  # type: ignore[method-assign]
    scheduler.listen_tick = lambda: runs.update(["listen"]) or TickReport()  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.loop, args=(stop,))
    loop.start()
    time.sleep(0.5)
    stop.set()
    loop.join(5)
    assert runs["tick"] >= 2 and runs["listen"] == 0, runs
