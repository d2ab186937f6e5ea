"""``/results/<taskid>.zip``: the files of the local result publisher
(``WORKERPOOL_RESULT_STORAGE=local``), whose links point here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from flask import Blueprint, send_from_directory

from api.errors import not_found

NAME = re.compile(r"^0x[0-9a-f]{64}\.zip$")


def create_blueprint(results_dir: Path | None) -> Blueprint:
    bp = Blueprint("results", __name__)

    @bp.get("/results/<name>")
    def result_file(name: str) -> Any:
        if results_dir is None or not NAME.match(name) or not (results_dir / name).is_file():
            raise not_found(f"no result {name}")
        return send_from_directory(results_dir, name, mimetype="application/zip")

    return bp
