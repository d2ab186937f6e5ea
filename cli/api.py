"""``workerpool api``: the status API, dashboard and orderbook behind a production server.

Served by waitress: a pure-Python, threaded WSGI server that is production grade, needs no
C extension, no fork and no import string (it serves the app ``create_app`` returns, so the
settings are read once, here), and whose threads match what the app does: short reads of
MongoDB, Redis and the chain that spend their time waiting. Flask's development server is
only used by ``workerpool standalone``, the one-process demo.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cli.errors import refusals
from pool.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings, app: object, threads: int | None = None) -> None:
    """Serve ``app`` on WORKERPOOL_API_HOST:IEXEC_CORE_PORT until interrupted."""
    import waitress

    waitress.serve(
        app,
        host=settings.api_host,
        port=settings.core_port,
        threads=threads or settings.api_threads,
        ident="workerpool",
        clear_untrusted_proxy_headers=True,
    )


def check_node(settings: Settings) -> None:
    """Refuse to start against a node of another chain than the settings name; a node that
    does not answer now is only logged (the API starts, /healthz says the chain is down)."""
    if not (settings.chain_rpc_url and settings.hub_address):
        return
    import dataclasses

    from poco.errors import TransportError
    from pool.wallets import chain_client, check_chain

    quick = dataclasses.replace(settings, rpc_retries=0, rpc_timeout=3.0)
    try:
        check_chain(settings, chain_client(quick))
    except TransportError as exc:
        log.warning("the chain node does not answer now (%s): /healthz will say so", exc)


@click.command("api")
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=None,
    help="Requests served at once (default: WORKERPOOL_API_THREADS).",
)
def command(threads: int | None) -> None:
    """Serve the status API, /metrics, /healthz and the dashboard (reads MongoDB, Redis, chain)."""
    from api.app import create_app
    from api.security import SecretFilter, secret_values

    with refusals():
        settings = Settings.from_env()
    # (logging is configured by the `workerpool` group: -v for INFO, -vv for DEBUG)
    secret_filter = SecretFilter(secret_values(settings))
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    if settings.mongo_uri().startswith("mongomock://"):
        log.warning(
            "MONGO_URL=mongomock:// gives this process its own, empty, in-memory store: the "
            "scheduler's data is not visible here. For the embedded mode run `workerpool "
            "standalone` (scheduler + API in one process); in production point MONGO_URL at "
            "the scheduler's MongoDB."
        )
    with refusals():
        check_node(settings)
    # the local publisher's folder (shared with the workers), served under /results
    results_dir = Path(settings.local_results_dir) if settings.local_results_dir else None
    app = create_app(settings, results_dir=results_dir)
    mode = "read-write (bearer token set)" if settings.api_token else "read-only"
    click.echo(
        f"workerpool API on http://{settings.api_host}:{settings.core_port}/ ({mode}); "
        f"pool {settings.pool_address or '(no POOL_ADDRESS)'}"
    )
    serve(settings, app, threads)
