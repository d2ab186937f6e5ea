"""The API's two guarantees: read-only unless a bearer token is configured and presented,
and no secret of the settings in any response or log line.

* Every request whose method can change something (anything but GET, HEAD and OPTIONS) is
  checked in one ``before_request`` hook, so a blueprint added later is covered without
  remembering a decorator. Without ``WORKERPOOL_API_TOKEN`` such requests get 403; with it,
  a missing or wrong ``Authorization: Bearer`` gets 401. The one exception is the views
  marked ``self_authenticated`` (the orderbook's publish/unpublish): iExec tooling calls them
  with the market's own authorization, a one-time challenge signed by the order's signer,
  which those views verify themselves.
* The API itself never puts a key in a body, but the process may hold some (the standalone
  mode runs the scheduler beside it, with its wallet): as a second line, every response body
  and every log record is scrubbed of the secret settings' values (private keys, passwords,
  mnemonics, the token, and the contents of the ``*_FILE`` settings that hold secrets).
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from flask import Flask, Response, current_app, request

from api.errors import error_response
from api.orderbook import SELF_AUTHENTICATED
from pool.broker import redis_password
from pool.redact import redact_urls
from pool.settings import SETTINGS, Settings, SettingsError

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MASK = "***"
MIN_SECRET_LEN = 6  # shorter values would mask ordinary text; refuse-worthy anyway


def secret_values(settings: Settings) -> list[str]:
    """Every secret the settings hold, in the spellings it could be printed in."""
    raw: set[str] = set()
    for name, spec in SETTINGS.items():
        value = getattr(settings, name, "")
        if spec.secret and isinstance(value, str) and value:
            raw.add(value)
        base = SETTINGS.get(name.removesuffix("_file"))
        if name.endswith("_file") and base is not None and base.secret and value:
            try:
                content = Path(str(value)).read_text().strip()
            except OSError:
                continue
            if content:
                raw.add(content)
    # Redis' password (its file is not a secret setting's _FILE twin), and URLs that carry a
    # password, a key in their path or query (an RPC URL): text stored before they were
    # masked at the source must not show them either
    try:
        password = redis_password(settings)
    except SettingsError:
        password = ""
    if password:
        raw.add(password)
    for name in ("chain_rpc_url", "redis_url", "mongo_url"):
        url = getattr(settings, name, None)
        if isinstance(url, str) and url and redact_urls(url) != url:
            raw.add(url)
    spellings: set[str] = set()
    for value in raw:
        bare = value.strip().removeprefix("0x").removeprefix("0X")
        for form in (value.strip(), bare, bare.lower(), bare.upper()):
            if len(form) >= MIN_SECRET_LEN:
                spellings.add(form)
    return sorted(spellings, key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class SecretFilter(logging.Filter):
    """Masks secrets in log records (message and arguments) before any handler sees them."""

    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        clean = scrub(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            if scrub(text, self.secrets) != text:
                record.exc_text = scrub(text, self.secrets)
                record.exc_info = None
        return True


TOKEN_CONFIG = "WORKERPOOL_API_TOKEN"


def has_token() -> bool:
    """Whether the current request presents the configured bearer token (reads that show
    more than the public view, such as a failed run's log tail, ask this)."""
    token = str(current_app.config.get(TOKEN_CONFIG) or "")
    if not token:
        return False
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )


def install(app: Flask, settings: Settings) -> None:
    secrets = secret_values(settings)
    token = settings.api_token
    app.config[TOKEN_CONFIG] = token

    @app.before_request
    def require_token() -> Response | None:
        if request.method in SAFE_METHODS or request.routing_exception is not None:
            return None  # reads are open; unknown routes and methods answer 404/405
        view = app.view_functions.get(request.endpoint or "")
        if getattr(view, SELF_AUTHENTICATED, False):
            return None  # the orderbook's publish/unpublish check a signed challenge instead
        if not token:
            return error_response(
                403,
                "read_only",
                "this API is read-only: set WORKERPOOL_API_TOKEN to enable mutating routes",
            )
        if not has_token():
            log.warning(
                "refused %s %s: missing or wrong bearer token", request.method, request.path
            )
            return error_response(
                401,
                "unauthorized",
                "this route needs Authorization: Bearer <WORKERPOOL_API_TOKEN>",
                {"WWW-Authenticate": 'Bearer realm="workerpool"'},
            )
        return None

    @app.after_request
    def scrub_response(response: Response) -> Response:
        if not secrets or response.direct_passthrough or response.is_streamed:
            return response
        if response.mimetype not in ("application/json", "text/html", "text/plain"):
            return response
        body = response.get_data(as_text=True)
        clean = scrub(body, secrets)
        if clean != body:
            log.error("a response of %s held a secret: masked", request.path)
            response.set_data(clean)
        return response
