"""The Celery app factory and the queue names every service agrees on.

Services never import each other's tasks: they send them by name (``app.send_task(NAME)``)
to the queues below, and each service registers only its own tasks on its own app.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from poco.tags import tag_to_int
from pool.settings import Settings

SCHEDULER_QUEUE = "scheduler"
REPLICATE_QUEUES = {
    "standard": "replicates.standard",
    "gpu": "replicates.gpu",
    "tee-scone": "replicates.tee-scone",
    "tee-gramine": "replicates.tee-gramine",
}

# Task names: the contract between services (each side registers only its own).
TICK_TASK = "scheduler.tick"  # beat -> scheduler: listen, initialize, plan, reconcile
LISTEN_TASK = "scheduler.listen"  # beat -> scheduler, between ticks: new deals only
AUTHORIZE_TASK = "scheduler.authorize"  # worker -> scheduler, answered through the backend
REPLICATE_UPDATE_TASK = "scheduler.replicate_update"  # worker -> scheduler: status changes
HEARTBEAT_TASK = "scheduler.worker_heartbeat"  # worker -> scheduler: alive, capabilities
REPLICATE_TASK = "workers.run_replicate"  # scheduler -> any worker of the queue
CONTRIBUTE_TASK = "workers.contribute"  # a node's compute process -> its control process
REVEAL_TASK = "workers.reveal"  # scheduler -> one worker (its own queue)
UPLOAD_TASK = "workers.upload"  # scheduler -> one worker (its own queue)


# Redis key prefix: a node writes the wall-clock time of each heartbeat under it
SEEN_PREFIX = "workerpool:node-seen:"


def worker_queue(address: str) -> str:
    """The queue only one worker node consumes (reveal and upload requests)."""
    return f"worker.{address.lower()}"


TEE, SCONE, GRAMINE, GPU = 1 << 0, 1 << 1, 1 << 2, 1 << 8


def queue_for_tag(tag: str | bytes | int) -> str:
    """The replicate queue a deal's tag selects (TEE framework first, then GPU)."""
    value = tag_to_int(tag)
    if value & TEE and value & SCONE:
        return REPLICATE_QUEUES["tee-scone"]
    if value & TEE and value & GRAMINE:
        return REPLICATE_QUEUES["tee-gramine"]
    if value & GPU:
        return REPLICATE_QUEUES["gpu"]
    return REPLICATE_QUEUES["standard"]


def make_celery(settings: Settings, name: str = "workerpool") -> Celery:
    # the result backend only carries authorization answers (AUTHORIZE_TASK)
    app = Celery(name, broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_queues=[Queue(SCHEDULER_QUEUE), *(Queue(q) for q in REPLICATE_QUEUES.values())],
        task_default_queue=SCHEDULER_QUEUE,
        task_routes={
            name: {"queue": SCHEDULER_QUEUE}
            for name in (
                TICK_TASK,
                LISTEN_TASK,
                AUTHORIZE_TASK,
                REPLICATE_UPDATE_TASK,
                HEARTBEAT_TASK,
            )
        },
        task_ignore_result=True,
        result_expires=3600,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # acks_late on Redis: an unacked message is redelivered after this many seconds,
        # so it must exceed the longest replicate (XL category: 10 * 36000 s final deadline).
        broker_transport_options={"visibility_timeout": 12 * 3600},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        enable_utc=True,
        worker_hijack_root_logger=False,
    )
    return app
