"""The OpenAPI document of the API, served at ``/api/v1/openapi.json`` (and ``.yaml``).

It is written by hand in ``api/openapi.yaml`` (reviewable, with prose) rather than generated,
and two tests keep it honest: every route of the app is in it (and nothing else), and a
property-based run (schemathesis) checks every response against it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, Response, jsonify

DOCUMENT = Path(__file__).with_name("openapi.yaml")

bp = Blueprint("docs", __name__, url_prefix="/api/v1")


@functools.cache
def openapi_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text())
    return document


@bp.get("/openapi.json")
def openapi_json() -> Any:
    return jsonify(openapi_document())


@bp.get("/openapi.yaml")
def openapi_yaml() -> Response:
    return Response(DOCUMENT.read_text(), mimetype="application/yaml")
