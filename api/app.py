"""The Flask API of the pool: one blueprint per resource, built by :func:`create_app`.

``/api/v1``: ``pool``, ``workers``, ``deals``, ``tasks``, ``orders`` and the OpenAPI document;
``/healthz`` and ``/metrics`` for machines; ``/`` the dashboard; ``/results`` the local
publisher's files; the market-compatible orderbook (``api/orderbook.py``); and iexec-core's
task routes and the Compass-shaped discovery route for iExec tooling (``api/core.py``).

Why it is built this way:

* ``create_app(settings)`` connects to nothing: the store, Redis and the chain are opened on
  first use (:mod:`api.context`), so the app can be built before they are up, and
  ``/healthz`` can then say which one is missing. A store may be passed in (the standalone
  mode and the tests share an in-memory one with the scheduler).
* Every error, whoever raises it, is ``{"error": {"status", "code", "message"}}``
  (:mod:`api.errors`), except the orderbook's, which answers in the iExec market's shape.
* Read-only unless ``WORKERPOOL_API_TOKEN`` is set; secrets never leave in a body
  (:mod:`api.security`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Flask

from api import (
    core,
    dashboard,
    deals,
    docs,
    health,
    metrics,
    orders,
    overview,
    results,
    tasks,
    workers,
)
from api.context import EXTENSION, ApiContext, ChainProbe
from api.errors import register_error_handlers
from api.orderbook import orderbook_blueprint
from api.security import install as install_security
from pool.settings import Settings
from pool.store import Store


def create_app(
    settings: Settings,
    store: Store | None = None,
    results_dir: Path | None = None,
    *,
    redis: Any = None,
    chain: ChainProbe | None = None,
) -> Flask:
    """The API app. ``store``/``redis``/``chain`` default to ones built from ``settings`` on
    first use; ``results_dir`` is served under ``/results`` (local result publisher)."""
    app = Flask("api", template_folder="templates", static_folder="static")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20  # bodies are small orders, never uploads
    context = ApiContext(settings, store, redis, chain)
    app.extensions[EXTENSION] = context

    register_error_handlers(app)
    install_security(app, settings)

    app.register_blueprint(overview.bp)
    app.register_blueprint(workers.bp)
    app.register_blueprint(deals.bp)
    app.register_blueprint(tasks.bp)
    app.register_blueprint(orders.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(metrics.create_blueprint(context))
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(results.create_blueprint(results_dir))
    app.register_blueprint(orderbook_blueprint(settings, store))
    app.register_blueprint(core.create_blueprint(context))
    return app
