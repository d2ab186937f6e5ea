"""One error body for every failure of the API, whatever raised it.

Clients (the dashboard, ``workerpool status``, scripts, Prometheus' scraper) only ever have
to read ``{"error": {"status", "code", "message"}}``: Flask's own 404/405 pages, a bad query
parameter, a store that is down and a bug all come out in that shape. A bug's message is
generic on purpose: an exception's text may carry a URL with credentials or a document.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from pymongo.errors import PyMongoError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered as is: status, a stable machine code and a message for people."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


def not_found(message: str) -> ApiError:
    return ApiError(404, "not_found", message)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": {"status": status, "code": code, "message": message}})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def _code(exc: HTTPException) -> str:
    name = (exc.name or "error").lower()
    return "".join(c if c.isalnum() else "_" for c in name)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        headers = {}
        if status == 405 and exc.get_response().headers.get("Allow"):
            headers["Allow"] = str(exc.get_response().headers["Allow"])
        return error_response(status, _code(exc), exc.description or exc.name, headers)

    @app.errorhandler(PyMongoError)
    def store_error(exc: PyMongoError) -> Response:
        log.warning("store unavailable: %s", type(exc).__name__)
        return error_response(503, "store_unavailable", "the MongoDB store does not answer")

    @app.errorhandler(Exception)
    def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error (see the API's log)")
