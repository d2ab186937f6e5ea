"""``workerpool standalone``: the scheduler and the status API in one process.

This is the embedded mode of the demo: with ``MONGO_URL=mongomock://`` the store lives in
memory, so every service that reads it must share the process. It is the one place where two
services are composed; they are imported here by name, at run time, and still talk to worker
nodes only through Redis. Production runs ``workerpool scheduler`` and ``workerpool api``
separately against MongoDB.
"""

from __future__ import annotations

import importlib
import logging
import threading
from pathlib import Path
from typing import Any

from werkzeug.serving import make_server

from pool.celery_app import SCHEDULER_QUEUE
from pool.settings import Settings

log = logging.getLogger(__name__)


def run(settings: Settings, results_dir: Path, concurrency: int = 4) -> None:
    service = importlib.import_module("scheduler.service")
    tasks = importlib.import_module("scheduler.tasks")
    api = importlib.import_module("api.app")

    scheduler: Any = service.build(settings)
    app = tasks.create_scheduler_app(settings, scheduler)
    scheduler.celery = app
    flask_app = api.create_app(settings, scheduler.store, results_dir)
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
