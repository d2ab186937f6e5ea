"""``workerpool scheduler``: beat and a Celery worker on the ``scheduler`` queue."""

from __future__ import annotations

import os

import click

from cli.errors import refusals
from pool.messages import SCHEDULER_QUEUE
from pool.settings import Settings, without_effect


@click.command("scheduler")
@click.option(
    "--concurrency", default=4, show_default=True, help="Threads serving scheduler tasks."
)
@click.option(
    "--beat/--no-beat",
    default=True,
    show_default=True,
    help="Run the beat (the periodic tick) inside this process. In production run exactly one "
    "beat: `workerpool scheduler --beat-only` once, and `--no-beat` nodes as needed.",
)
@click.option("--beat-only", is_flag=True, help="Run only the beat, no task consumer.")
@click.option("--loglevel", default="INFO", show_default=True)
def command(concurrency: int, beat: bool, beat_only: bool, loglevel: str) -> None:
    """Run the scheduler: chain listener, task initialization and replicate planning."""
    from scheduler.tasks import create_app

    with refusals():
        settings = Settings.from_env()
        app, scheduler = create_app(settings)  # fails fast on bad settings, wallet or chain
    click.echo(
        f"scheduler for pool {settings.pool_address} on {settings.chain_rpc_url} "
        f"(wallet {scheduler.ctx.wallet.address})"
    )
    for name, reason in without_effect(settings, os.environ, "scheduler"):
        click.echo(f"note: {name}: {reason}", err=True)
    if settings.public_chain_url:
        click.echo(f"worker nodes without a chain URL use {settings.public_chain_url}")
    if beat_only:
        app.start(["beat", "--loglevel", loglevel])
        return
    argv = ["worker", "-Q", SCHEDULER_QUEUE, "--pool", "threads", "-c", str(concurrency)]
    argv += ["--loglevel", loglevel, "-n", "scheduler@%h"]
    if beat:
        argv.append("-B")
    app.worker_main(argv)
