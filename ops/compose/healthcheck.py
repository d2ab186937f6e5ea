#!/usr/bin/env python3
"""Docker healthcheck of the workerpool services (installed in the image as
``workerpool-healthcheck``): ``workerpool-healthcheck scheduler|worker|api``.

* ``scheduler``: the Celery node ``scheduler@<hostname>`` of this container answers a ping
  through the broker (so the process runs *and* reaches Redis).
* ``worker``: both Celery nodes of a worker node answer: ``worker-…@<hostname>`` (compute)
  and ``control-…@<hostname>`` (contribute, reveal, upload).
* ``api``: ``GET /healthz`` answers 200 on the port the API listens on in this container.

The ping is sent only to this container's nodes (a glob on ``@<hostname>``), so a pool of many
workers is not flooded with replies. Exit status 0 is healthy, 1 is not; one line says why.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from typing import Any

# service -> prefixes of the Celery node names that must answer (names end in @<hostname>)
EXPECTED_NODES: dict[str, tuple[str, ...]] = {
    "scheduler": ("scheduler@",),
    "worker": ("worker-", "control-"),
}


def missing_nodes(service: str, answered: set[str], hostname: str) -> list[str]:
    """The expected node name prefixes of ``service`` with no answering node on ``hostname``."""
    mine = [name for name in answered if name.endswith("@" + hostname)]
    return [
        prefix
        for prefix in EXPECTED_NODES[service]
        if not any(name.startswith(prefix) for name in mine)
    ]


def ping_nodes(
    redis_url: str, hostname: str, timeout: float, tls: dict[str, Any] | None = None
) -> set[str]:
    """Names of the Celery nodes of ``hostname`` that answer a ping within ``timeout``
    (``tls``: the broker's TLS options, for a rediss:// URL)."""
    from celery import Celery

    app = Celery("workerpool-healthcheck", broker=redis_url)
    if tls is not None:
        app.conf.broker_use_ssl = tls
    app.conf.broker_connection_retry_on_startup = False
    app.conf.broker_connection_max_retries = 1
    try:
        replies = app.control.ping(timeout=timeout, pattern=f"*@{hostname}", matcher="glob")
    finally:
        app.close()
    return {name for reply in replies for name in reply}


def check_celery(service: str, timeout: float = 5.0) -> tuple[bool, str]:
    from pool.broker import redis_url, tls_options
    from pool.redact import redact_urls
    from pool.settings import Settings

    settings = Settings.from_env()
    hostname = socket.gethostname()
    try:
        answered = ping_nodes(redis_url(settings), hostname, timeout, tls_options(settings))
    except Exception as exc:  # the broker is down or refuses us: unhealthy, say why
        return False, f"{service}: cannot ping through the broker: {redact_urls(str(exc))}"
    missing = missing_nodes(service, answered, hostname)
    if missing:
        return (
            False,
            f"{service}: no answer from {', '.join(p + '*' for p in missing)} on {hostname}",
        )
    return True, f"{service}: {', '.join(sorted(answered))} answered"


def check_api(timeout: float = 5.0) -> tuple[bool, str]:
    port = os.environ.get("IEXEC_CORE_PORT") or "18090"
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, f"api: {url} answered {response.status}"
    except (urllib.error.URLError, OSError) as exc:
        return False, f"api: {url}: {exc}"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in (*EXPECTED_NODES, "api"):
        print("usage: workerpool-healthcheck scheduler|worker|api", file=sys.stderr)
        return 2
    service = argv[0]
    healthy, message = check_api() if service == "api" else check_celery(service)
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
