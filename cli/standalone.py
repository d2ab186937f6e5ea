"""``workerpool standalone``: the scheduler and the status API in one process.

This is the embedded mode of the demo: with ``MONGO_URL=mongomock://`` the store lives in
memory, so every service that reads it must share the process. It is the one place where two
services are composed: the API reads the scheduler's store, and the scheduler still talks to
worker nodes only through Redis. Production runs ``workerpool scheduler`` and ``workerpool
api`` separately against MongoDB.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import click

from cli.errors import refusals
from pool.messages import SCHEDULER_QUEUE
from pool.settings import Settings

log = logging.getLogger(__name__)


@click.command("standalone")
@click.option(
    "--results-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the local result publisher served under /results (default: a temp dir).",
)
def command(results_dir: Path | None) -> None:
    """Scheduler + status API in one process (embedded mode: MONGO_URL=mongomock://)."""
    with refusals():
        settings = Settings.from_env()
    directory = results_dir or Path(
        settings.local_results_dir or Path(tempfile.gettempdir()) / "workerpool-results"
    )
    directory.mkdir(parents=True, exist_ok=True)
    run(settings, directory)


def run(settings: Settings, results_dir: Path, concurrency: int = 4) -> None:
    from werkzeug.serving import make_server

    from api.app import create_app as create_api
    from scheduler.tasks import create_app as create_scheduler

    with refusals():
        app, scheduler = create_scheduler(settings)
    flask_app = create_api(settings, scheduler.store, results_dir)
    server = make_server(settings.api_host, settings.core_port, flask_app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True, name="api").start()
    log.info("API on http://%s:%d", settings.api_host, settings.core_port)
    stop = threading.Event()
    # the full tick every WORKERPOOL_POLL_PERIOD and, in between, the fast listen for new
    # deals every WORKERPOOL_LISTEN_PERIOD, on one thread
    threading.Thread(target=scheduler.loop, args=(stop,), daemon=True, name="tick").start()
    try:
        app.worker_main(
            [
                "worker",
                "-Q",
                SCHEDULER_QUEUE,
                "--pool",
                "threads",
                "-c",
                str(concurrency),
                "--loglevel",
                "INFO",
                "-n",
                "standalone@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        )
    finally:
        stop.set()
        server.shutdown()
