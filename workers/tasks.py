"""Celery wiring of a worker node: two Celery workers per node, each composed here.

* the **compute** worker consumes the replicate queues of the node's capabilities with one
  thread per slot: a slot is held from pulling the image until COMPUTED, nothing more;
* the **control** worker (a child process) consumes the node's own queue: contribute, and
  the reveal, upload and abort requests of the scheduler. It never waits behind a computation, and
  being the only sender of the node's transactions it owns the nonce sequence.
"""

from __future__ import annotations

import json
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
from pool import keys
from pool.messages import (
    ABORT,
    CONTRIBUTE,
    REPLICATE_QUEUES,
    REVEAL,
    RUN_REPLICATE,
    UPLOAD,
    Domain,
    MessageSigner,
    Messenger,
    make_celery,
)
from pool.settings import Settings, SettingsError, with_public_config
from pool.states import ReplicateStatus
from pool.wallets import checked_chain_client
from workers.identity import IndexLease, LeaseLost
from workers.node import JobRefused, WorkerNode
from workers.publishers import PublishError, make_publisher
from workers.runner import DockerRunner
from workers.tee import TdxRunner, start_check

log = logging.getLogger(__name__)

REQUEUE_DELAY = 3.0  # seconds before a job refused to this worker is offered again
MAX_REQUEUES = 50


def from_scheduler(settings: Settings, redis: Any) -> tuple[Settings, list[str]]:
    """The node's settings completed by what its scheduler publishes in Redis (the chain URL
    nodes use, hub, chain id, result base), each only where the node has none; returns them
    with what was taken. A node left without a chain URL is refused with what to set."""
    config: dict[str, Any] = {}
    raw = redis.get(keys.PUBLIC_CONFIG)
    if raw is not None:
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise SettingsError(
                f"the scheduler's published configuration is not JSON: {exc}"
            ) from exc
        if not isinstance(config, dict):
            raise SettingsError("the scheduler's published configuration is not a JSON object")
    settings, taken = with_public_config(settings, config)
    if not settings.chain_rpc_url:
        raise SettingsError(
            "missing IEXEC_PRIVATE_CHAIN_ADDRESS: this node has no chain URL and its scheduler "
            "publishes none (set IEXEC_PUBLIC_CHAIN_ADDRESS on the scheduler, or "
            "IEXEC_PRIVATE_CHAIN_ADDRESS here)"
        )
    return settings, taken


def compute_queues(settings: Settings) -> list[str]:
    """The replicate queues of the node's capabilities. A TEE queue comes only from
    WORKERPOOL_WORKER_TDX (a node declares TDX only when configured for it)."""
    queues = []
    for capability in settings.worker_capabilities:
        if capability not in REPLICATE_QUEUES:
            raise SettingsError(
                f"WORKERPOOL_WORKER_CAPABILITIES: unknown {capability!r}; "
                f"known: {', '.join(REPLICATE_QUEUES)}"
            )
        if capability.startswith("tee-"):
            raise SettingsError(
                f"WORKERPOOL_WORKER_CAPABILITIES: {capability} is not declared there: a node "
                "serves TDX tasks with WORKERPOOL_WORKER_TDX=on (or simulation), and no SGX "
                "framework (scone, gramine)"
            )
    for capability in settings.node_capabilities():
        queues.append(REPLICATE_QUEUES[capability])
    return queues


def build_node(
    settings: Settings,
    private_key: str,
    celery: Any,
    *,
    redis: Any = None,
    lease: IndexLease | None = None,
) -> WorkerNode:
    """A node from settings: chain client (checked to be the chain the settings name),
    wallet, the messenger that signs its messages to the scheduler (in the domain of this
    chain and POOL_ADDRESS), Docker runner, result publisher."""
    settings.require("pool_address")
    client = checked_chain_client(settings)
    wallet = client.wallet(private_key)
    domain = Domain(client.chain_id, str(settings.pool_address))
    messages = Messenger(celery, MessageSigner(private_key, domain))
    local_dir = Path(
        settings.local_results_dir or Path(tempfile.gettempdir()) / "workerpool-results"
    )
    publisher = make_publisher(
        settings.result_storage,
        ipfs_api_url=f"http://{settings.ipfs_host}:{settings.ipfs_port}",
        local_dir=local_dir,
        base_url=settings.result_base_url(),
    )
    runner = DockerRunner()
    tee = TdxRunner(settings, client, wallet, runner) if settings.worker_tdx != "off" else None
    return WorkerNode(
        settings, client, wallet, messages, runner, publisher, redis=redis, lease=lease, tee=tee
    )


def create_compute_app(
    settings: Settings, private_key: str, redis: Any, lease: IndexLease | None
) -> tuple[Celery, WorkerNode]:
    """The compute process: its Celery app, the node built on it, the receivers registered."""
    app = make_celery(settings, "workerpool-worker")
    node = build_node(settings, private_key, app, redis=redis, lease=lease)
    # what the node checked on its host before it declares TDX (SettingsError: it cannot)
    checks = start_check(settings, node.client.chain_id)
    if node.tee is not None:
        node.tee.checks = checks
        node.tee.start_api()
    register_compute(app, node)
    return app, node


def create_control_app(settings: Settings, private_key: str) -> tuple[Celery, WorkerNode]:
    """The control process: its Celery app, the node built on it, the receivers registered."""
    app = make_celery(settings, "workerpool-worker-control")
    node = build_node(settings, private_key, app)
    register_control(app, node)
    return app, node


def register_compute(app: Celery, node: WorkerNode) -> None:
    """The replicate job's receiver, and the node's heartbeat, janitor and resume threads
    started when the Celery worker is ready."""
    settings = node.settings

    @app.task(
        shared=False,
        name=RUN_REPLICATE.name,
        bind=True,
        acks_late=True,  # a node killed mid-job leaves the job in Redis
        reject_on_worker_lost=True,
        max_retries=MAX_REQUEUES,
    )
    def run_replicate(self: Any, payload: Any) -> dict[str, Any]:
        job = RUN_REPLICATE.parse(payload)
        try:
            outcome = node.run_replicate(job.taskid, job.deadline)
        except JobRefused as exc:
            # back to the queue, so that another worker can take it
            raise self.retry(countdown=REQUEUE_DELAY, exc=exc) from exc
        except RetryableError as exc:
            raise self.retry(countdown=REQUEUE_DELAY * 2, exc=exc) from exc
        log.info("replicate %s: %s %s", job.taskid, outcome.status, outcome.reason)
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
            node.check_output_mount()
        except Exception:  # the first task tries again
            log.exception("could not check whether the app output can be mounted")
        try:
            node.resume()
        except Exception:  # never take the node down: new jobs still run
            log.exception("resuming the replicates of a previous run failed")

    @worker_shutdown.connect(weak=False)
    def stop_heartbeat(**_: Any) -> None:
        stop.set()
        node.reporter.flush()  # a progress report still held


def register_control(app: Celery, node: WorkerNode) -> None:
    """The receivers of the node's own queue: contribute, reveal, upload, abort."""

    @app.task(shared=False, name=ABORT.name, acks_late=True)
    def abort(payload: Any) -> dict[str, Any]:
        request = ABORT.parse(payload)
        return node.abort(request.taskid, request.cause, request.reason, request.signature).__dict__

    @app.task(
        shared=False,
        name=CONTRIBUTE.name,
        acks_late=True,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        max_retries=10,
    )
    def contribute(payload: Any) -> dict[str, Any]:
        return node.contribute(CONTRIBUTE.parse(payload).taskid).__dict__

    @app.task(
        shared=False,
        name=REVEAL.name,
        acks_late=True,
        autoretry_for=(RetryableError,),
        retry_backoff=True,
        max_retries=10,
    )
    def reveal(payload: Any) -> dict[str, Any]:
        return node.reveal(REVEAL.parse(payload).taskid).__dict__

    @app.task(shared=False, name=UPLOAD.name, bind=True, acks_late=True, max_retries=5)
    def upload(self: Any, payload: Any) -> dict[str, Any]:
        taskid = UPLOAD.parse(payload).taskid
        try:
            return node.upload(taskid).__dict__
        except PublishError as exc:
            if exc.retryable and self.request.retries < self.max_retries:
                raise self.retry(countdown=2**self.request.retries, exc=exc) from exc
            # give up: back to REVEALED, so that the scheduler asks another winner
            node.report(
                taskid, ReplicateStatus.REVEALED, reason=f"upload failed: {exc}", upload_failed=True
            )
            return {"taskid": taskid, "status": "REVEALED", "reason": str(exc)}
