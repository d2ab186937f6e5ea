"""Celery wiring of a worker node: the replicate job and the reveal/upload requests."""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from poco.chain import ChainClient
from poco.errors import RetryableError
from pool.celery_app import (
    REPLICATE_QUEUES,
    REPLICATE_TASK,
    REVEAL_TASK,
    UPLOAD_TASK,
    make_celery,
    worker_queue,
)
from pool.publishers import PublishError
from pool.settings import Settings, SettingsError
from workers.node import JobRefused, WorkerNode

log = logging.getLogger(__name__)

HEARTBEAT_PERIOD = 10.0
REQUEUE_DELAY = 3.0  # seconds before a job refused to this worker is offered again
MAX_REQUEUES = 50


def worker_queues(settings: Settings, address: str) -> list[str]:
    queues = []
    for capability in settings.worker_capabilities:
        if capability not in REPLICATE_QUEUES:
            raise SettingsError(
                f"WORKERPOOL_WORKER_CAPABILITIES: unknown {capability!r}; "
                f"known: {', '.join(REPLICATE_QUEUES)}"
            )
        queues.append(REPLICATE_QUEUES[capability])
    return [*queues, worker_queue(address)]


def create_worker_app(settings: Settings, node: WorkerNode) -> Celery:
    app = make_celery(settings, "workerpool-worker")

    @app.task(
        shared=False,  # bound to this app and its closure only (tests build several apps)
        name=REPLICATE_TASK,
        bind=True,
        acks_late=True,  # a node killed mid-job leaves the job in Redis for another node
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

    @app.task(
        shared=False,  # bound to this app and its closure only (tests build several apps)
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
            if exc.retryable:
                raise self.retry(countdown=2**self.request.retries, exc=exc) from exc
            raise

    stop = threading.Event()

    @worker_ready.connect(weak=False)
    def start_heartbeat(**_: Any) -> None:
        threading.Thread(
            target=node.heartbeat_forever, args=(HEARTBEAT_PERIOD, stop), daemon=True
        ).start()

    @worker_shutdown.connect(weak=False)
    def stop_heartbeat(**_: Any) -> None:
        stop.set()

    return app


def build_node(settings: Settings) -> WorkerNode:
    from pool.publishers import make_publisher
    from pool.wallets import worker_key
    from workers.runner import DockerRunner

    settings.require("chain_rpc_url", "hub_address")
    client = ChainClient(
        str(settings.chain_rpc_url),
        str(settings.hub_address),
        request_timeout=settings.rpc_timeout,
        retries=settings.rpc_retries,
        receipt_timeout=settings.tx_timeout,
    )
    wallet = client.wallet(worker_key(settings))
    local_dir = Path(
        settings.local_results_dir or Path(tempfile.gettempdir()) / "workerpool-results"
    )
    publisher = make_publisher(
        settings.result_storage,
        ipfs_api_url=f"http://{settings.ipfs_host}:{settings.ipfs_port}",
        local_dir=local_dir,
        base_url=settings.public_url or f"http://{settings.api_host}:{settings.core_port}",
    )
    node = WorkerNode(settings, client, wallet, make_celery(settings), DockerRunner(), publisher)
    return node
