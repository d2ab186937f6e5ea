"""Fixtures shared by all tests: the real services (Redis, IPFS, Docker, test app images).

`ops/test` starts the services and sets WORKERPOOL_REQUIRE_SERVICES=1, so an
integration test whose service is missing fails there (and in CI) instead of being
skipped; run bare `pytest` on a machine without them and those tests skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    import docker
    import redis

# the devnet fixtures (anvil + PoCo, started by the tests) live in tests/devnet_fixtures.py
pytest_plugins = ["devnet_fixtures", "pool_fixtures", "scheduler_fixtures"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6399/0"
DEFAULT_IPFS_API = "http://127.0.0.1:5011"
DEFAULT_IPFS_GATEWAY = "http://127.0.0.1:8091"

# name -> tag of the images built by ops/apps/build (no registry involved)
APP_IMAGES: dict[str, str] = {
    name: f"workerpool-apps/{name}:1"
    for name in (
        "echo",
        "crash",
        "bigout",
        "sleep",
        "nocomputed",
        "evil",
        "callback",
        "failwrite",
        "deeptree",
        "spin",
        "fsprobe",
    )
}


def services_required() -> bool:
    """True when a missing service must fail the test (ops/test, CI), not skip it."""
    if os.environ.get("WORKERPOOL_REQUIRE_SERVICES") == "1":
        return True
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_service(name: str, reason: str) -> NoReturn:
    """Fail (ops/test, CI) or skip (a bare local run) a test whose service is missing."""
    message = f"{name} is not available: {reason}"
    if services_required():
        pytest.fail(f"{message} (services are required here: run tests with ops/test)")
    pytest.skip(message)


# --- Redis -------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real redis-server (ops/test starts one on 127.0.0.1:6399)."""
    import redis

    url = os.environ.get("WORKERPOOL_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        require_service("redis", f"{url}: {exc}")
    finally:
        client.close()
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the test database, flushed before the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


# --- IPFS --------------------------------------------------------------------


@pytest.fixture(scope="session")
def ipfs_api_url() -> str:
    """URL of a real IPFS RPC API (ops/test starts js-ipfs, offline, on 127.0.0.1:5011)."""
    import requests

    url = os.environ.get("WORKERPOOL_TEST_IPFS_API", DEFAULT_IPFS_API).rstrip("/")
    try:
        response = requests.post(f"{url}/api/v0/id", timeout=5)
        response.raise_for_status()
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        require_service("ipfs", f"{url}/api/v0/id: {exc}")
    if not isinstance(body, dict) or not body.get("ID"):
        require_service("ipfs", f"{url}/api/v0/id answered without a peer ID: {body!r:.200}")
    return url


@pytest.fixture(scope="session")
def ipfs_gateway_url(ipfs_api_url: str) -> str:
    """URL of the same IPFS node's HTTP gateway (ops/test: 127.0.0.1:$WP_IPFS_GATEWAY_PORT),
    where requesters fetch results."""
    import requests

    url = os.environ.get("WORKERPOOL_TEST_IPFS_GATEWAY", DEFAULT_IPFS_GATEWAY).rstrip("/")
    try:
        requests.head(url, timeout=5)
    except requests.RequestException as exc:
        require_service("ipfs gateway", f"{url}: {exc}")
    return url


# --- Docker ------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A Docker SDK client on the local engine (ops/test starts dockerd if needed)."""
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        require_service("docker", str(exc))
    yield client
    client.close()


@pytest.fixture(scope="session")
def app_images(docker_client: docker.DockerClient) -> dict[str, str]:
    """name -> tag of the local test app images, each checked to exist in the engine."""
    import docker

    missing = []
    for tag in APP_IMAGES.values():
        try:
            docker_client.images.get(tag)
        except docker.errors.ImageNotFound:
            missing.append(tag)
    if missing:
        require_service(
            "test app images", f"missing {', '.join(missing)}: run `bash ops/apps/build`"
        )
    return dict(APP_IMAGES)
