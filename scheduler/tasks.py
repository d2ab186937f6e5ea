"""Celery wiring of the scheduler: the periodic ``scheduler.tick`` task and its beat entry."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery

from pool.celery_app import SCHEDULER_QUEUE, TICK_TASK, make_celery
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
        name=TICK_TASK,
        queue=SCHEDULER_QUEUE,
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

    app.conf.beat_schedule = {
        "scheduler-tick": {
            "task": TICK_TASK,
            "schedule": period,
            "options": {"queue": SCHEDULER_QUEUE, "expires": max(period * 2, 1.0)},
        }
    }
    pool = (settings.pool_address or "none").lower()
    app.conf.beat_schedule_filename = str(Path(tempfile.gettempdir()) / f"workerpool-beat-{pool}")
    app.scheduler_service = get
    return app
