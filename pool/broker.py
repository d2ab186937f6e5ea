"""How every process reaches Redis: one server (``redis://``, or ``rediss://`` for TLS), or
the primary that a group of Redis Sentinels names (``sentinel://``), the same way for the
Celery broker, its result backend and the plain Redis clients (liveness keys, leases, the
tick lock, the API).

``WORKERPOOL_REDIS_URL`` is either

* ``redis[s]://[:password@]host:port/db``: one Redis server; or
* ``sentinel://[:password@]host:port/db;sentinel://[:password@]host:port/db;...``: one part
  per Sentinel (Celery's form), the password being the Redis servers' one; the Sentinels
  know the primary as ``WORKERPOOL_REDIS_MASTER_NAME``, and ``WORKERPOOL_REDIS_SENTINEL_
  PASSWORD`` is the Sentinels' own password when they require one.

The Redis password comes from the URL or, better, from a file
(``WORKERPOOL_REDIS_PASSWORD_FILE``: a Docker secret, never in the environment), which wins.
A ``rediss://`` server is verified against ``WORKERPOOL_REDIS_CA_FILE`` (a private CA) or the
system's CAs. TLS through Sentinel is not supported: a Sentinel group runs on a private
network (docs/deploy.md).

Every connection is made for a link that may be slow, lossy or cut, and for a primary that
may die: connect and command timeouts (a dead peer never blocks a process for good), TCP
keepalive (a connection that died silently is found), a health check before reusing an idle
connection, and with Sentinel a new primary looked up after a connection error.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from pool.settings import Settings, SettingsError

log = logging.getLogger(__name__)

# seconds; see the module docstring
CONNECT_TIMEOUT = 10.0
SOCKET_TIMEOUT = 30.0  # longer than any command the services send (BRPOP waits 1 s)
HEALTH_CHECK_INTERVAL = 10
# a silent peer is found after KEEPIDLE + KEEPCNT * KEEPINTVL seconds (45 s)
KEEPALIVE_OPTIONS = {
    getattr(socket, name): value
    for name, value in (("TCP_KEEPIDLE", 15), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
    if hasattr(socket, name)
}


def redis_password(settings: Settings) -> str:
    """The password in WORKERPOOL_REDIS_PASSWORD_FILE ('' when the setting is empty)."""
    if not settings.redis_password_file:
        return ""
    try:
        return Path(settings.redis_password_file).read_text().rstrip("\r\n")
    except OSError as exc:
        raise SettingsError(f"WORKERPOOL_REDIS_PASSWORD_FILE: {exc}") from exc


def redis_url(settings: Settings) -> str:
    """WORKERPOOL_REDIS_URL with the password of WORKERPOOL_REDIS_PASSWORD_FILE in it (the file
    wins over a password already in the URL)."""
    url = settings.redis_url
    password = redis_password(settings)
    if not password:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def tls_options(settings: Settings) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL (None for ``redis://``): the server's
    certificate is always verified, against WORKERPOOL_REDIS_CA_FILE when set."""
    if not settings.redis_url.lower().startswith("rediss://"):
        return None
    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_ca_file:
        if not Path(settings.redis_ca_file).is_file():
            raise SettingsError(f"WORKERPOOL_REDIS_CA_FILE: no file {settings.redis_ca_file}")
        options["ssl_ca_certs"] = settings.redis_ca_file
    return options


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is, read from the settings."""

    url: str
    sentinels: tuple[tuple[str, int], ...]  # empty: one server at ``url``
    master_name: str
    password: str | None  # the Redis servers' (with Sentinel; else it is in the URL)
    sentinel_password: str | None
    db: int

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)


def target(settings: Settings) -> RedisTarget:
    """Parse ``WORKERPOOL_REDIS_URL`` (and the Sentinel settings); SettingsError says what
    is wrong."""
    url = settings.redis_url
    parts = [p for p in url.split(";") if p.strip()]
    schemes = {urlsplit(p.strip()).scheme for p in parts}
    if "sentinel" not in schemes and len(parts) == 1:
        return RedisTarget(redis_url(settings), (), "", None, None, 0)
    if schemes != {"sentinel"}:
        raise SettingsError(
            "WORKERPOOL_REDIS_URL: one redis://host:port/db URL, or sentinel://host:port/db "
            "parts separated by ';' (one per Sentinel), not a mix"
        )
    if not settings.redis_master_name:
        raise SettingsError(
            "WORKERPOOL_REDIS_MASTER_NAME is required with a sentinel:// WORKERPOOL_REDIS_URL "
            "(the name in the Sentinels' `sentinel monitor <name> ...`)"
        )
    sentinels = []
    password: str | None = None
    db = 0
    for part in parts:
        split = urlsplit(part.strip())
        try:
            port = split.port or 26379
        except ValueError as exc:
            raise SettingsError(f"WORKERPOOL_REDIS_URL: {exc}") from None
        if not split.hostname:
            raise SettingsError("WORKERPOOL_REDIS_URL: a sentinel:// part has no host")
        sentinels.append((split.hostname, port))
        if split.password and password is None:
            password = unquote(split.password)
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise SettingsError(f"WORKERPOOL_REDIS_URL: database {path!r} is not a number")
            db = int(path)
    if settings.redis_ca_file:
        raise SettingsError(
            "WORKERPOOL_REDIS_CA_FILE: TLS through Sentinel is not supported; run the Sentinel "
            "group on a private network (docs/deploy.md)"
        )
    return RedisTarget(
        url,
        tuple(sentinels),
        settings.redis_master_name,
        redis_password(settings) or password,
        settings.redis_sentinel_password or None,
        db,
    )


# ---- kombu's Redis transport, for a connection torn down under its channels -----------------
class SafeQoS(kombu_redis.QoS):
    """kombu's Redis QoS, when the broker connection may be torn down under the channel (a
    cut link, a Sentinel failover). kombu 5.7 then lets an AttributeError escape from the
    channel's close (giving back the unacknowledged messages) and from a late ack; the first
    stops the Celery worker for good ("Unrecoverable error"). Here both are logged instead:
    the messages stay unacknowledged in Redis and come back after the visibility timeout
    (a replicate job that comes back late is dropped by the worker that takes it: its task is
    no longer open, or the scheduler refuses what the task does not need)."""

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        try:
            return super().restore_unacked_once(stderr)
        except AttributeError as exc:
            log.warning(
                "broker connection gone: %d unacknowledged message(s) left to the visibility "
                "timeout (%s)",
                len(self._delivered),
                exc,
            )
            return None

    def ack(self, delivery_tag: Any) -> None:
        try:
            super().ack(delivery_tag)
        except AttributeError as exc:
            log.warning("broker connection gone: ack left to the visibility timeout (%s)", exc)
            kombu_virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except AttributeError as exc:
            log.warning("broker connection gone: reject left to the visibility timeout (%s)", exc)
            kombu_virtual.QoS.reject(self, delivery_tag, requeue=requeue)


class _Channel(kombu_redis.Channel):
    QoS = SafeQoS


class _SentinelChannel(kombu_redis.SentinelChannel):
    QoS = SafeQoS


class RedisTransport(kombu_redis.Transport):
    """``redis://`` with :class:`SafeQoS`."""

    Channel = _Channel


class SentinelTransport(kombu_redis.SentinelTransport):
    """``sentinel://`` with :class:`SafeQoS`."""

    Channel = _SentinelChannel


def connection_options(timeout: float = SOCKET_TIMEOUT) -> dict[str, Any]:
    """redis-py connection keywords for a link that may fail (see the module docstring)."""
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_timeout": timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE_OPTIONS,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry_on_timeout": True,
    }


def redis_client(settings: Settings, *, timeout: float = SOCKET_TIMEOUT) -> Any:
    """A Redis client on the primary: the one server, or the one the Sentinels name now
    (looked up again after a connection error, so a failover is followed)."""
    import redis
    from redis.sentinel import Sentinel

    where = target(settings)
    options = connection_options(timeout)
    if not where.sentinel:
        return redis.Redis.from_url(where.url, **(tls_options(settings) or {}), **options)
    sentinel = Sentinel(
        list(where.sentinels),
        sentinel_kwargs={
            "password": where.sentinel_password,
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": CONNECT_TIMEOUT,
        },
        **options,
    )
    return sentinel.master_for(where.master_name, password=where.password, db=where.db)


def celery_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings that say how to reach Redis, broker and result backend alike."""
    where = target(settings)
    transport: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "socket_keepalive": True,
        "socket_keepalive_options": KEEPALIVE_OPTIONS,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry_on_timeout": True,
    }
    backend: dict[str, Any] = {}
    if where.sentinel:
        sentinel: dict[str, Any] = {"master_name": where.master_name}
        if where.sentinel_password:
            sentinel["sentinel_kwargs"] = {"password": where.sentinel_password}
        transport.update(sentinel)
        backend.update(sentinel)
    scheme = urlsplit(where.url.split(";")[0].strip()).scheme
    transport_cls = {
        "redis": RedisTransport,
        "rediss": RedisTransport,
        "sentinel": SentinelTransport,
    }.get(scheme)
    tls = tls_options(settings)
    options: dict[str, Any] = {
        "broker_url": where.url,
        # kombu's own for any other scheme (socket://)
        "broker_transport": f"{__name__}:{transport_cls.__name__}" if transport_cls else None,
        "result_backend": where.url,
        "broker_transport_options": transport,
        "result_backend_transport_options": backend,
        "redis_socket_timeout": SOCKET_TIMEOUT,
        "redis_socket_connect_timeout": CONNECT_TIMEOUT,
        "redis_socket_keepalive": True,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": HEALTH_CHECK_INTERVAL,
    }
    if tls is not None:
        options["broker_use_ssl"] = tls
        options["redis_backend_use_ssl"] = tls
    return options
