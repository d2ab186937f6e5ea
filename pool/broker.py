"""How every process reaches Redis: the URL with its password, and TLS.

``WORKERPOOL_REDIS_URL`` names the server (``rediss://`` for TLS); the password comes from the
URL's userinfo (``redis://:PASSWORD@host:6379/0``) or, better, from a file
(``WORKERPOOL_REDIS_PASSWORD_FILE``: a Docker secret, never in the environment); a ``rediss://``
server is verified against ``WORKERPOOL_REDIS_CA_FILE`` (a private CA) or the system's CAs.
The scheduler, the worker nodes, the API, the Celery broker and result backend all connect
through the functions here, so they all speak to Redis the same way.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from pool.settings import Settings, SettingsError


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


def redis_client(settings: Settings, **kwargs: Any) -> Any:
    """A redis-py client on the pool's Redis (``kwargs``: timeouts)."""
    import redis

    return redis.Redis.from_url(redis_url(settings), **(tls_options(settings) or {}), **kwargs)


def celery_options(settings: Settings) -> dict[str, Any]:
    """Broker and result backend of a Celery app on the pool's Redis."""
    url = redis_url(settings)
    options: dict[str, Any] = {"broker_url": url, "result_backend": url}
    tls = tls_options(settings)
    if tls is not None:
        options["broker_use_ssl"] = tls
        options["redis_backend_use_ssl"] = tls
    return options
