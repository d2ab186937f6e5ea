"""``workerpool worker``: a Celery worker node serving the replicate queues it is able to."""

from __future__ import annotations

import sys

import click

from pool.settings import Settings, SettingsError


@click.command("worker")
@click.option("--loglevel", default="INFO", show_default=True)
def command(loglevel: str) -> None:
    """Run a worker node: compute replicates in Docker, contribute, reveal, upload results."""
    from workers.tasks import build_node, create_worker_app, worker_queues

    try:
        settings = Settings.from_env()
        node = build_node(settings)
        queues = worker_queues(settings, node.address)
    except (SettingsError, Exception) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"worker {node.name} ({node.address}) serving {', '.join(queues)}")
    app = create_worker_app(settings, node)
    node.celery = app
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
