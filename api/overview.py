"""``/api/v1/pool``: the pool at a glance (what the dashboard's summary and
``workerpool status`` show)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from api.context import ctx
from api.queries import pool_summary

bp = Blueprint("pool", __name__, url_prefix="/api/v1")


@bp.get("/pool")
def pool() -> Any:
    return jsonify(pool_summary(ctx()))
