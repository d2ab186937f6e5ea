"""``workerpool worker``: one worker node = a compute Celery worker + its control child.

The parent resolves the node's identity (keystore, devnet key, or a mnemonic index leased in
Redis), starts the control process (contribute, reveal, upload on the node's own queue) and
hands it the key on a pipe (never in argv or the environment), then runs the compute worker.
The child asks the kernel to kill it when the parent dies, so a ``kill -9`` of the node
leaves no half of it running.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile

import click

from cli.errors import refusals
from pool.settings import SETTINGS, Settings, without_effect

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _celery_argv(queues: str, concurrency: int, loglevel: str, name: str) -> list[str]:
    return [
        "worker",
        "-Q",
        queues,
        "--pool",
        "threads",
        "-c",
        str(concurrency),
        "--loglevel",
        loglevel,
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def _resolved(settings: Settings) -> dict[str, str]:
    """The values a node may take from its scheduler, as environment for its control child."""
    out: dict[str, str] = {}
    for name in ("chain_rpc_url", "hub_address", "public_url", "sms_tdx_url", "result_proxy_url"):
        value = getattr(settings, name)
        if value:
            out[SETTINGS[name].env] = str(value)
    if settings.chain_id:
        out[SETTINGS["chain_id"].env] = str(settings.chain_id)
    return out


@click.command("worker")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--control", is_flag=True, hidden=True, help="Internal: the node's control process.")
def command(loglevel: str, control: bool) -> None:
    """Run a worker node: compute replicates in Docker, contribute, reveal, upload results."""
    if control:
        run_control(loglevel)
    else:
        run_compute(loglevel)


def run_control(loglevel: str) -> None:
    """The control process: the key comes on stdin from the compute process."""
    from pool.messages import worker_queue
    from workers.tasks import create_control_app

    key = sys.stdin.readline().strip()
    with refusals(ValueError):
        app, node = create_control_app(Settings.from_env(), key)
    try:
        app.worker_main(
            _celery_argv(
                worker_queue(node.address), 4, loglevel, f"control-{node.address.lower()[:10]}"
            )
        )
    finally:
        node.reporter.flush()  # a progress report still held


def run_compute(loglevel: str) -> None:
    from pool import broker
    from workers import identity
    from workers.tasks import compute_queues, create_compute_app, from_scheduler

    with refusals(ValueError):
        settings = Settings.from_env()
        queues = compute_queues(settings)
        if not settings.worker_dir:  # both processes must share the work directory
            settings = dataclasses.replace(
                settings, worker_dir=tempfile.mkdtemp(prefix="workerpool-worker-")
            )
        client = broker.redis_client(settings)
        settings, taken = from_scheduler(settings, client)
        if taken:  # before the node is built and its chain checked against these values
            click.echo(f"from the scheduler: {', '.join(taken)}", err=True)
        key, lease = identity.resolve(settings, client)
        app, node = create_compute_app(settings, key, client, lease)
    for name, reason in without_effect(settings, os.environ, "worker"):
        click.echo(f"note: {name}: {reason}", err=True)
    if node.tee is not None:
        for line in node.tee.checks:
            click.echo(line, err=True)
        if node.tee.api is not None:
            click.echo(f"TDX: enclave API on {node.tee.api.address}", err=True)

    # the control process reads the same settings, the scheduler's published ones included
    env = {**os.environ, "IEXEC_WORKER_BASE_DIR": settings.worker_dir, **_resolved(settings)}
    child = subprocess.Popen(
        [sys.executable, "-m", "cli", "worker", "--control", "--loglevel", loglevel],
        stdin=subprocess.PIPE,
        env=env,
        preexec_fn=_die_with_parent,
    )
    assert child.stdin is not None
    child.stdin.write((key + "\n").encode())
    child.stdin.close()

    def stop_child() -> None:
        if child.poll() is None:
            child.terminate()

    atexit.register(stop_child)
    lease_note = f", index {lease.index}" if lease else ""
    click.echo(
        f"worker {node.name} ({node.address}{lease_note}) serving {', '.join(queues)} "
        f"with {settings.worker_slots} slot(s); control pid {child.pid}"
    )
    with refusals():
        gas = node.gas()
    if gas.empty:  # iexec-worker exits here; this node waits for a refill, giving jobs back
        click.echo(f"warning: {gas.describe(node.address)}: jobs go back to the queue", err=True)
    try:
        app.worker_main(
            _celery_argv(
                ",".join(queues),
                settings.worker_slots,
                loglevel,
                f"worker-{node.address.lower()[:10]}",
            )
        )
    finally:
        if lease is not None:
            lease.release()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
