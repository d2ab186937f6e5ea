"""The fast listen beside the full tick (docs/performance.md hot spots 4 and 19), on fakes: the
scheduler's Celery worker and the standalone loop run it when a new block comes (a block filter
where the node keeps one, the head polled every WORKERPOOL_LISTEN_PERIOD otherwise), it reads
nothing but the head while the chain does not move, and it never runs at the same time as a
tick of the same scheduler. The devnet side (a deal picked up without a full tick, the filter
and the polling on anvil) is in test_scheduler.py."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from pool.messages import LISTEN_TASK, SCHEDULER_QUEUE, TICK_TASK, make_celery
from pool.settings import Settings
from scheduler import deals as deals_mod
from scheduler.context import SchedulerContext, TickReport
from scheduler.deals import BlockWatch
from scheduler.service import Scheduler
from scheduler.tasks import listen_step, register
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


def test_the_worker_listens_on_new_blocks_the_beat_only_ticks_and_not_when_turned_off() -> None:
    app = make_celery(Settings(pool_address=POOL))
    chain = fake_chain()
    scheduler = make(chain, listen_period=0.02, poll_period=2.0)
    register(app, scheduler)
    beat = app.conf.beat_schedule
    assert set(beat) == {"scheduler-tick"} and beat["scheduler-tick"]["task"] == TICK_TASK
    assert LISTEN_TASK in app.tasks  # (what a beat of an earlier version sends is served)
    assert app.conf.task_routes[LISTEN_TASK] == {"queue": SCHEDULER_QUEUE}
    # the scheduler's Celery worker runs a step that listens whenever a block comes
    (step,) = [s for s in app.steps["worker"] if getattr(s, "label", "") == "block listen"]
    listens: list[int] = []
    scheduler.listen_tick = lambda: listens.append(chain.head) or TickReport()  # type: ignore[method-assign, func-returns-value]
    running = step(parent=None)
    running.start(None)
    try:
        _wait(lambda: len(listens) == 1)  # the first look: blocks may have come before
        time.sleep(0.2)
        assert len(listens) == 1  # no block, no listen
        chain.head += 1
        _wait(lambda: len(listens) == 2)
    finally:
        running.stop(None)
    assert running.thread is not None and not running.thread.is_alive()
    assert chain.calls["eth_blockNumber"] == 0 and chain.calls["eth_getFilterChanges"] >= 5

    # a Celery worker that ends (here as an embedded worker ends: terminated) stops it
    embedded = Celery("listen-step", broker="memory://", backend="cache+memory://")
    embedded.steps["worker"].add(listen_step(scheduler))
    before = {t for t in threading.enumerate() if t.name == "block-listen"}
    with start_worker(embedded, pool="solo", perform_ping_check=False, shutdown_timeout=20):
        _wait(lambda: {t for t in threading.enumerate() if t.name == "block-listen"} - before)
    assert {t for t in threading.enumerate() if t.name == "block-listen"} <= before

    off = make_celery(Settings(pool_address=POOL))
    register(off, make(fake_chain(), listen_period=0))
    assert not [s for s in off.steps["worker"] if getattr(s, "label", "") == "block listen"]


def _wait(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.01)


# ---- new blocks: a block filter where the node keeps one, the head polled otherwise --------
def test_with_a_block_filter_a_look_is_one_filter_read_and_says_only_new_blocks() -> None:
    chain = fake_chain()
    watch = BlockWatch(chain, period=0.01)
    # the first look makes the filter (and says "maybe": blocks may have come before it)
    assert watch.look() is True and watch.mode == "filter"
    chain.calls.clear()
    # while no block comes, each look is one eth_getFilterChanges and says no
    assert [watch.look() for _ in range(5)] == [False] * 5
    assert chain.calls == Counter({"eth_getFilterChanges": 5})
    # a block (or three) since the last look: yes, once
    chain.head += 3
    assert watch.look() is True and watch.look() is False
    # the node forgot the filter (restarted, expired): a new one, and a listen to be sure
    chain.forget_filters()
    assert watch.look() is True
    assert watch.look() is True and watch.mode == "filter"  # (the new filter's first look)
    assert watch.look() is False
    assert chain.calls["eth_blockNumber"] == 0
    watch.close()
    assert chain.calls["eth_uninstallFilter"] == 1


def test_a_node_that_refuses_filters_is_polled_and_asked_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chain = fake_chain()
    chain.filters = False
    watch = BlockWatch(chain, period=0.01)
    # the node refuses a filter: the head is read, and compared with the last one
    assert watch.look() is True and watch.mode == "poll"
    assert [watch.look() for _ in range(3)] == [False] * 3
    chain.head += 1
    assert watch.look() is True and watch.look() is False
    assert chain.calls["eth_newBlockFilter"] == 1  # not asked again at every look
    assert chain.calls["eth_blockNumber"] == 6
    # FILTER_RETRY later the node is asked again (it may have been restarted)
    chain.filters = True
    monkeypatch.setattr(deals_mod, "FILTER_RETRY", 0.0)
    assert watch.look() is True and watch.mode == "filter"
    assert watch.look() is False


def test_waiting_for_a_block_returns_when_one_comes_or_at_the_timeout() -> None:
    chain = fake_chain()
    watch = BlockWatch(chain, period=0.01)
    stop = threading.Event()
    assert watch.wait(stop, 1.0) is True  # the filter's first look
    started = time.monotonic()
    assert watch.wait(stop, 0.1) is False and time.monotonic() - started >= 0.1
    threading.Timer(0.05, lambda: setattr(chain, "head", chain.head + 1)).start()
    assert watch.wait(stop, 5.0) is True
    stop.set()
    assert watch.wait(stop, 5.0) is False


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


def test_the_standalone_loop_listens_when_a_block_comes_between_two_full_ticks() -> None:
    chain = fake_chain()
    scheduler = make(chain, poll_period=0.4, listen_period=0.01)
    runs: Counter[str] = Counter()
    scheduler.tick = lambda: runs.update(["tick"]) or TickReport()  # type: ignore[method-assign]
    scheduler.listen_tick = lambda: runs.update(["listen"]) or TickReport()  # type: ignore[method-assign]
    stop = threading.Event()
    loop = threading.Thread(target=scheduler.loop, args=(stop,))
    loop.start()
    time.sleep(0.5)
    quiet = runs["listen"]
    for _ in range(5):  # a block every 0.1 s
        chain.head += 1
        time.sleep(0.1)
    stop.set()
    loop.join(5)
    assert not loop.is_alive()
    # a full tick at start and every 0.4 s; no listen while no block comes (but the first
    # look's), then one per block
    assert 2 <= runs["tick"] <= 5, runs
    assert quiet == 1, runs
    assert runs["listen"] - quiet >= 4, runs


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
