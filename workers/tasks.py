"""Celery wiring of a worker node: two Celery workers per node.

* the **compute** worker consumes the replicate queues of the node's capabilities with one
  thread per slot: a slot is held from pulling the image until COMPUTED, nothing more;
* the **control** worker (a child process) consumes the node's own queue: contribute, and
  the reveal and upload requests of the scheduler. It never waits behind a computation, and
  being the only sender of the node's transactions it owns the nonce sequence.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from poco.errors import RetryableError
from pool.celery_app import (
    CONTRIBUTE_TASK,
    REPLICATE_QUEUES,
    REPLICATE_TASK,
    REVEAL_TASK,
    UPLOAD_TASK,
    make_celery,
    worker_queue,
)
from pool.publishers import PublishError
from pool.settings import Settings, SettingsError
from pool.states import ReplicateStatus
from workers.identity import LeaseLost
from workers.node import JobRefused, WorkerNode

log = logging.getLogger(__name__)

REQUEUE_DELAY = 3.0  # seconds before a job refused to this worker is offered again
MAX_REQUEUES = 50


def compute_queues(settings: Settings) -> list[str]:
    queues = []
    for capability in settings.worker_capabilities:
        if capability not in REPLICATE_QUEUES:
            raise SettingsError(
                f"WORKERPOOL_WORKER_CAPABILITIES: unknown {capability!r}; "
                f"known: {', '.join(REPLICATE_QUEUES)}"
            )
        queues.append(REPLICATE_QUEUES[capability])
    return queues


def create_compute_app(settings: Settings, node: WorkerNode) -> Celery:
    app = make_celery(settings, "workerpool-worker")

    @app.task(
        shared=False,
        name=REPLICATE_TASK,
        bind=True,
        acks_late=True,  # a node killed mid-job leaves the job in Redis
        reject_on_worker_lost=True,
        max_retries=MAX_REQUEUES,
    )
    def run_replicate(self: Any, taskid: str, deadline: int | None = None) -> dict[str, Any]:
        try:
            outcome = node.run_replicate(taskid, deadline)
        except JobRefused as exc:
            # back to the queue, so that another worker can take it
            raise self.retry(countdown=REQUEUE_DELAY, exc=exc) from exc
        except RetryableError as exc:
            raise self.retry(countdown=REQUEUE_DELAY * 2, exc=exc) from exc
        log.info("replicate %s: %s %s", taskid, outcome.status, outcome.reason)
        return outcome.__dict__

    stop = threading.Event()

    def beat() -> None:
        try:
            node.heartbeat_forever(settings.heartbeat_period, stop)
        except LeaseLost as exc:
            log.critical("%s: stopping this node so that two nodes never share an identity", exc)
            os.kill(os.getpid(), signal.SIGTERM)

    @worker_ready.connect(weak=False)
    def start_heartbeat(sender: Any = None, **_: Any) -> None:
        if sender is not None and sender.app is not app:
            return
        threading.Thread(target=beat, daemon=True, name="heartbeat").start()
        threading.Thread(
            target=node.janitor_forever,
            args=(settings.heartbeat_period * 6, stop),
            daemon=True,
            name="janitor",
        ).start()
        threading.Thread(target=resume, daemon=True, name="resume").start()

    def resume() -> None:
        try:
            node.resume()
        except Exception:  # never take the node down: new jobs still run
            log.exception("resuming the replicates of a previous run failed")

    @worker_shutdown.connect(weak=False)
    def stop_heartbeat(**_: Any) -> None:
        stop.set()

    return app


def create_control_app(settings: Settings, node: WorkerNode) -> Celery:
    app = make_celery(settings, "workerpool-worker-control")

    @app.task(
        shared=False,
        name=CONTRIBUTE_TASK,
        acks_late=True,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        max_retries=10,
    )
    def contribute(taskid: str) -> dict[str, Any]:
        return node.contribute(taskid).__dict__

    @app.task(
        shared=False,
        name=REVEAL_TASK,
        acks_late=True,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        max_retries=10,
    )
    def reveal(taskid: str) -> dict[str, Any]:
        return node.reveal(taskid).__dict__

    @app.task(shared=False, name=UPLOAD_TASK, bind=True, acks_late=True, max_retries=5)
    def upload(self: Any, taskid: str) -> dict[str, Any]:
        try:
            return node.upload(taskid).__dict__
        except PublishError as exc:
            if exc.retryable and self.request.retries < self.max_retries:
                raise self.retry(countdown=2**self.request.retries, exc=exc) from exc
            # give up: back to REVEALED, so that the scheduler asks another winner
            node.report(
                taskid, ReplicateStatus.REVEALED, reason=f"upload failed: {exc}", uploadFailed=True
            )
            return {"taskid": taskid, "status": "REVEALED", "reason": str(exc)}

    return app


def build_node(settings: Settings, private_key: str) -> WorkerNode:
    from pool.publishers import make_publisher
    from pool.wallets import chain_client
    from workers.runner import DockerRunner

    client = chain_client(settings)
    wallet = client.wallet(private_key)
    local_dir = Path(
        settings.local_results_dir or Path(tempfile.gettempdir()) / "workerpool-results"
    )
    publisher = make_publisher(
        settings.result_storage,
        ipfs_api_url=f"http://{settings.ipfs_host}:{settings.ipfs_port}",
        local_dir=local_dir,
        base_url=settings.public_url or f"http://{settings.api_host}:{settings.core_port}",
    )
    return WorkerNode(settings, client, wallet, make_celery(settings), DockerRunner(), publisher)


__all__ = [
    "build_node",
    "compute_queues",
    "create_compute_app",
    "create_control_app",
    "worker_queue",
]
