"""Celery wiring of the scheduler: the receivers of the messages workers send it
(:mod:`pool.messages`, checked by :mod:`scheduler.inbox`), the periodic ``scheduler.tick`` and
its beat entry, the thread that listens when a new block comes (a worker step; the
``scheduler.listen`` task stays for a beat of an earlier version), and the composition of a
scheduler process (:func:`create_app`)."""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

from poco.errors import RetryableError
from pool.messages import (
    AUTHORIZE,
    HEARTBEAT,
    LISTEN_TASK,
    REPORT,
    SCHEDULER_QUEUE,
    TICK_TASK,
    Messenger,
    make_celery,
)
from pool.settings import Settings
from scheduler.context import TickReport
from scheduler.reports import NotYet
from scheduler.service import Scheduler, build

log = logging.getLogger(__name__)

# a report not confirmed yet is looked at again after 5, 10 and 20 s (a chain node a few
# blocks behind the worker's, a heartbeat behind the report), then refused (iexec-core: 3
# looks, 6 blocks apart)
CHAIN_LAG_RETRIES = 3
CHAIN_LAG_DELAY = 5.0


def create_app(settings: Settings) -> tuple[Celery, Scheduler]:
    """A scheduler process: its one Celery app, the scheduler built on it, the receivers
    registered. Fails fast on bad settings, wallet or chain."""
    app = make_celery(settings, "workerpool-scheduler")
    scheduler = build(settings, Messenger(app))
    register(app, scheduler)
    return app, scheduler


def listen_step(scheduler: Scheduler) -> type[bootsteps.StartStopStep]:
    """A step of the scheduler's Celery worker: beside its consumers, a thread that runs the
    fast listen whenever the chain has a new block (``Scheduler.listen_forever``), started and
    stopped with the worker. Every consumer process runs one; the tick lock lets one listen
    at a time. (The beat does not send the listen: it could only poll on a period.)"""

    class BlockListen(bootsteps.StartStopStep):
        label = "block listen"

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.stop_event = threading.Event()
            self.thread: threading.Thread | None = None

        def start(self, parent: Any) -> None:
            self.stop_event.clear()
            self.thread = threading.Thread(
                target=scheduler.listen_forever,
                args=(self.stop_event,),
                daemon=True,
                name="block-listen",
            )
            self.thread.start()

        def stop(self, parent: Any) -> None:
            self.stop_event.set()
            if self.thread is not None:
                self.thread.join(timeout=10)

        def terminate(self, parent: Any) -> None:
            # a cold shutdown (and the end of an embedded worker) terminates the steps; a
            # step without an object of its own would do nothing and leave the thread
            # listening for a worker that is gone
            self.stop(parent)

    return BlockListen


def register(app: Celery, scheduler: Scheduler) -> None:
    """Register the scheduler's receivers and its beat schedule on ``app``."""
    settings = scheduler.settings
    period = settings.poll_period
    listen_period = settings.listen_period

    def periodic(name: str, run: Callable[[], TickReport]) -> None:
        @app.task(
            shared=False,  # bound to this app and its closure only (tests build several apps)
            name=name,
            acks_late=False,  # a lost tick (or listen) is replaced by the next one
            ignore_result=True,
            soft_time_limit=max(60, int(period * 30)),
            time_limit=max(90, int(period * 40)),
        )
        def step() -> dict[str, Any]:
            report = run()
            if (
                report.deals_new
                or report.tasks_initialized
                or report.jobs_enqueued
                or report.errors
            ):
                log.info("%s: %s", name, report)
            return report.__dict__

    periodic(TICK_TASK, scheduler.tick)
    periodic(LISTEN_TASK, scheduler.listen_tick)

    # worker -> scheduler: each one a signed envelope, checked by the inbox before anything
    # is applied (scheduler/inbox.py)
    @app.task(
        shared=False,
        name=AUTHORIZE.name,
        ignore_result=False,  # the worker waits for this answer
        acks_late=False,  # a worker whose request is lost asks again
        time_limit=60,
    )
    def authorize(envelope: Any) -> dict[str, Any]:
        return scheduler.inbox.authorize(envelope).to_wire()

    @app.task(
        shared=False,
        name=REPORT.name,
        bind=True,
        acks_late=True,  # a report survives a scheduler restart in Redis
        reject_on_worker_lost=True,
        time_limit=300,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        max_retries=10,
    )
    def replicate_update(self: Any, envelope: Any) -> None:
        tries = self.request.retries
        try:
            scheduler.inbox.report(
                envelope, last_try=tries >= CHAIN_LAG_RETRIES, first_try=tries == 0
            )
        except NotYet as exc:  # the scheduler's chain node may be a few blocks behind
            raise self.retry(countdown=CHAIN_LAG_DELAY * 2**tries, exc=exc) from exc

    @app.task(shared=False, name=HEARTBEAT.name, acks_late=False, time_limit=30)
    def heartbeat(envelope: Any) -> None:
        scheduler.inbox.heartbeat(envelope)

    app.conf.beat_schedule = {
        "scheduler-tick": {
            "task": TICK_TASK,
            "schedule": period,
            "options": {"queue": SCHEDULER_QUEUE, "expires": max(period * 2, 1.0)},
        }
    }
    if listen_period:  # new deals between two ticks (WORKERPOOL_LISTEN_PERIOD, 0: off)
        app.steps["worker"].add(listen_step(scheduler))
    pool = (settings.pool_address or "none").lower()
    app.conf.beat_schedule_filename = str(Path(tempfile.gettempdir()) / f"workerpool-beat-{pool}")
