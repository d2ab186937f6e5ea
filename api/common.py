"""Helpers every resource shares: parameter checks, pagination and JSON conversion.

Parameters are checked strictly and a bad one is a 400 naming it (never silently clamped
or ignored), so what the OpenAPI document promises is what the routes do: a client that
asks for page 0 or 1000 items per page learns it at once instead of getting something else.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import request

from api.errors import bad_request
from pool.clock import utcnow

HEX32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
DEFAULT_PER_PAGE = 50
MAX_PER_PAGE = 200


def check_hex32(value: str, what: str) -> str:
    """A dealid/taskid as stored (lower-case hex), or a 400 naming ``what``."""
    if not HEX32.match(value):
        raise bad_request(f"{what} must be 0x followed by 64 hex digits")
    return value.lower()


def check_address(value: str, what: str = "address") -> str:
    if not ADDRESS.match(value):
        raise bad_request(f"{what} must be 0x followed by 40 hex digits")
    return value.lower()


def int_arg(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw):
        raise bad_request(f"{name} must be an integer")
    value = int(raw)
    if value < low or (high is not None and value > high):
        if high is None:
            raise bad_request(f"{name} must be >= {low}")
        raise bad_request(f"{name} must be between {low} and {high}")
    return value


def choice_arg(name: str, choices: Iterable[str]) -> str | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    allowed = list(choices)
    if raw not in allowed:
        raise bad_request(f"{name} must be one of {', '.join(allowed)}")
    return raw


def paginate(
    count: Callable[[], int],
    fetch: Callable[[int, int], Iterable[dict[str, Any]]],
    shape: Callable[[dict[str, Any]], dict[str, Any]] = lambda d: d,
) -> dict[str, Any]:
    """The page asked by ``page``/``per_page``: ``fetch(skip, limit)`` reads it, ``count()``
    the total. A page past the end is empty (not a 404): the total may shrink while a
    client pages."""
    page = int_arg("page", 1, 1, 1_000_000)
    per_page = int_arg("per_page", DEFAULT_PER_PAGE, 1, MAX_PER_PAGE)
    total = count()
    items = [jsonable(shape(doc)) for doc in fetch((page - 1) * per_page, per_page)]
    return {
        "items": items,
        "page": page,
        "perPage": per_page,
        "total": total,
        "pages": math.ceil(total / per_page),
    }


def jsonable(value: Any) -> Any:
    """Mongo documents as JSON: datetimes (naive UTC in the store) as ISO 8601 with Z."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items() if k != "_id"}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(timespec="milliseconds") + "Z"
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return value


def age_seconds(when: Any, now: dt.datetime | None = None) -> float | None:
    if not isinstance(when, dt.datetime):
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return max(0.0, round(((now or utcnow()) - when).total_seconds(), 3))
