"""``workerpool scheduler``: beat and a Celery worker on the ``scheduler`` queue."""

from __future__ import annotations

import sys

import click

from pool.celery_app import SCHEDULER_QUEUE
from pool.settings import Settings, SettingsError


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
    from scheduler.service import build
    from scheduler.tasks import create_scheduler_app

    try:
        settings = Settings.from_env()
        scheduler = build(settings)  # fail fast on bad settings, wallet or chain
    except (SettingsError, Exception) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(
        f"scheduler for pool {settings.pool_address} on {settings.chain_rpc_url} "
        f"(wallet {scheduler.wallet.address})"
    )
    app = create_scheduler_app(settings, scheduler)
    if beat_only:
        app.start(["beat", "--loglevel", loglevel])
        return
    argv = ["worker", "-Q", SCHEDULER_QUEUE, "--pool", "threads", "-c", str(concurrency)]
    argv += ["--loglevel", loglevel, "-n", "scheduler@%h"]
    if beat:
        argv.append("-B")
    app.worker_main(argv)
