"""Celery wiring of the scheduler: the periodic ``scheduler.tick`` and ``scheduler.listen``
tasks and their beat entries."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery

from poco.errors import RetryableError
from pool.celery_app import (
    AUTHORIZE_TASK,
    HEARTBEAT_TASK,
    LISTEN_TASK,
    REPLICATE_UPDATE_TASK,
    SCHEDULER_QUEUE,
    TICK_TASK,
    make_celery,
)
from pool.settings import Settings
from scheduler.service import Scheduler, build

log = logging.getLogger(__name__)


def create_scheduler_app(settings: Settings, scheduler: Scheduler | None = None) -> Celery:
    """The scheduler's Celery app. ``scheduler`` is built from settings on first use."""
    app = make_celery(settings, "workerpool-scheduler")
    holder: dict[str, Scheduler] = {} if scheduler is None else {"s": scheduler}
    lock = threading.Lock()

    def get() -> Scheduler:
        with lock:
            if "s" not in holder:
                holder["s"] = build(settings)
            return holder["s"]

    period = settings.poll_period

    @app.task(
        shared=False,  # bound to this app and its closure only (tests build several apps)
        name=TICK_TASK,
        acks_late=False,  # a lost tick is replaced by the next one
        ignore_result=True,
        soft_time_limit=max(60, int(period * 30)),
        time_limit=max(90, int(period * 40)),
    )
    def tick() -> dict[str, Any]:
        report = get().tick()
        if report.deals_new or report.tasks_initialized or report.jobs_enqueued or report.errors:
            log.info("tick: %s", report)
        return report.__dict__

    listen_period = settings.listen_period

    @app.task(
        shared=False,  # bound to this app and its closure only (tests build several apps)
        name=LISTEN_TASK,
        acks_late=False,  # a lost listen is replaced by the next one
        ignore_result=True,
        soft_time_limit=max(60, int(period * 30)),
        time_limit=max(90, int(period * 40)),
    )
    def listen() -> dict[str, Any]:
        report = get().listen_tick()
        if report.deals_new or report.tasks_initialized or report.jobs_enqueued or report.errors:
            log.info("listen: %s", report)
        return report.__dict__

    @app.task(
        shared=False,  # bound to this app and its closure only (tests build several apps)
        name=AUTHORIZE_TASK,
        ignore_result=False,  # the worker waits for this answer
        acks_late=False,  # a worker whose request is lost asks again
        time_limit=60,
    )
    def authorize(taskid: str, worker: str, enclave: str) -> dict[str, Any]:
        return get().lifecycle.authorize(taskid, worker, enclave)

    @app.task(
        shared=False,  # bound to this app and its closure only (tests build several apps)
        name=REPLICATE_UPDATE_TASK,
        acks_late=True,  # a report survives a scheduler restart in Redis
        reject_on_worker_lost=True,
        time_limit=300,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        max_retries=10,
    )
    def replicate_update(
        taskid: str, worker: str, status: str, details: dict[str, Any] | None = None
    ) -> None:
        get().lifecycle.on_report(taskid, worker, status, details)

    @app.task(shared=False, name=HEARTBEAT_TASK, acks_late=False, time_limit=30)
    def heartbeat(worker: str, info: dict[str, Any]) -> None:
        get().lifecycle.heartbeat(worker, info)

    app.conf.beat_schedule = {
        "scheduler-tick": {
            "task": TICK_TASK,
            "schedule": period,
            "options": {"queue": SCHEDULER_QUEUE, "expires": max(period * 2, 1.0)},
        }
    }
    if listen_period:  # new deals between two ticks (WORKERPOOL_LISTEN_PERIOD, 0: off)
        app.conf.beat_schedule["scheduler-listen"] = {
            "task": LISTEN_TASK,
            "schedule": listen_period,
            # a late listen is worth nothing: the next one (or the tick) does the same
            "options": {"queue": SCHEDULER_QUEUE, "expires": max(listen_period * 2, 1.0)},
        }
    pool = (settings.pool_address or "none").lower()
    app.conf.beat_schedule_filename = str(Path(tempfile.gettempdir()) / f"workerpool-beat-{pool}")
    app.scheduler_service = get
    return app
