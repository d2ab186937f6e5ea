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

from pool.settings import Settings, SettingsError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@click.command("worker")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--control", is_flag=True, hidden=True, help="Internal: the node's control process.")
def command(loglevel: str, control: bool) -> None:
    """Run a worker node: compute replicates in Docker, contribute, reveal, upload results."""
    import redis

    from pool.celery_app import worker_queue
    from workers import identity
    from workers.tasks import build_node, compute_queues, create_compute_app, create_control_app

    try:
        settings = Settings.from_env()
        if control:
            key = sys.stdin.readline().strip()
            node = build_node(settings, key)
        else:
            queues = compute_queues(settings)
            if not settings.worker_dir:  # both processes must share the work directory
                settings = dataclasses.replace(
                    settings, worker_dir=tempfile.mkdtemp(prefix="workerpool-worker-")
                )
            client = redis.Redis.from_url(settings.redis_url)
            key, lease = identity.resolve(settings, client)
            node = build_node(settings, key)
            node.redis, node.lease = client, lease
    except (SettingsError, Exception) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)

    if control:
        app = create_control_app(settings, node)
        node.celery = app
        app.worker_main(
            [
                "worker",
                "-Q",
                worker_queue(node.address),
                "--pool",
                "threads",
                "-c",
                "4",
                "--loglevel",
                loglevel,
                "-n",
                f"control-{node.address.lower()[:10]}@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        )
        return

    env = {**os.environ, "IEXEC_WORKER_BASE_DIR": settings.worker_dir}
    child = subprocess.Popen(
        [sys.executable, "-m", "pool.cli", "worker", "--control", "--loglevel", loglevel],
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
    lease_note = f", index {node.lease.index}" if node.lease else ""
    click.echo(
        f"worker {node.name} ({node.address}{lease_note}) serving {', '.join(queues)} "
        f"with {settings.worker_slots} slot(s); control pid {child.pid}"
    )
    app = create_compute_app(settings, node)
    node.celery = app
    try:
        app.worker_main(
            [
                "worker",
                "-Q",
                ",".join(queues),
                "--pool",
                "threads",
                "-c",
                str(settings.worker_slots),
                "--loglevel",
                loglevel,
                "-n",
                f"worker-{node.address.lower()[:10]}@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        if node.lease is not None:
            node.lease.release()
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
