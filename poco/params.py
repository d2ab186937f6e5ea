"""A deal's ``params`` as iExec reads them (iexec-commons-poco ``DealParams``).

The worker reads them to run the app (args, input files, where the result goes); the API
shows the requester's command line from them. Parsing is pure (no I/O), so every layer that
needs it reads the same thing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class DealParams:
    """The deal's ``params`` (iexec-commons-poco ``DealParams``), with its defaults.

    An empty ``iexec_result_storage_provider`` / ``_proxy`` means "not set": the worker
    uses IPFS and the pool's result proxy. A standard (non-TEE) task asking for
    ``iexec_result_encryption`` must be refused by the caller, as iexec-worker does.
    """

    iexec_args: str = ""
    iexec_input_files: list[str] = field(default_factory=list)
    iexec_result_storage_provider: str = ""
    iexec_result_storage_proxy: str = ""
    iexec_result_encryption: bool = False
    iexec_secrets: dict[str, str] = field(default_factory=dict)
    bulk_cid: str = ""


_KNOWN_PARAMS = frozenset(
    {
        "iexec_args",
        "iexec_input_files",
        "iexec_result_storage_provider",
        "iexec_result_storage_proxy",
        "iexec_result_encryption",
        "iexec_secrets",
        "bulk_cid",
    }
)


class _NotParams(ValueError):
    """Internal: the text is not a DealParams JSON object (so it is all ``iexec_args``)."""


def _as_text(key: str, value: Any) -> str:
    """A JSON scalar as Jackson coerces it into a String field (``5`` -> ``"5"``)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return json.dumps(value)
    raise _NotParams(f"{key}: expected a string, got {type(value).__name__}")


def _as_bool(key: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value != 0
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _NotParams(f"{key}: expected a boolean, got {value!r}")


def parse_deal_params(params: str | bytes | None) -> DealParams:
    """Read the deal's ``params`` as iexec-commons-poco ``DealParams.createFromString`` does.

    - empty -> defaults (the empty string is the args, which split to none);
    - a JSON object whose keys are all known -> those fields;
    - anything else (not JSON, not an object, an unknown key such as the removed
      ``iexec_developer_logger``, a value of the wrong type) -> the **whole string** is
      ``iexec_args``. This looks odd but is iexec-worker's rule (Jackson fails on unknown
      properties and the worker falls back to "the requester wants to run the whole
      string"); following it keeps old deals and plain-text params meaning the same here.

    Like Jackson (``FAIL_ON_TRAILING_TOKENS`` off), text after the JSON object is ignored
    and scalars are coerced into string fields. Where Java would crash (the JSON ``null``)
    we fall back to args too.
    """
    if params is None:
        return DealParams()
    if isinstance(params, bytes):
        params = params.decode("utf-8", errors="replace")
    try:
        return _params_from_json(params)
    except _NotParams as exc:
        if params.strip():
            log.info("deal params are not a DealParams JSON object (%s): all of it is args", exc)
        return DealParams(iexec_args=params)


def _params_from_json(text: str) -> DealParams:
    stripped = text.lstrip()
    try:
        data, _end = json.JSONDecoder().raw_decode(stripped)
    except ValueError as exc:
        raise _NotParams(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise _NotParams(f"JSON {type(data).__name__}, not an object")
    unknown = sorted(set(data) - _KNOWN_PARAMS)
    if unknown:
        raise _NotParams(f"unknown key(s) {', '.join(unknown)}")
    files = data.get("iexec_input_files")
    if files is None:
        files = []
    if not isinstance(files, list):
        raise _NotParams("iexec_input_files: expected a list")
    secrets = data.get("iexec_secrets")
    if secrets is None:
        secrets = {}
    if not isinstance(secrets, dict):
        raise _NotParams("iexec_secrets: expected an object")
    return DealParams(
        iexec_args=_as_text("iexec_args", data.get("iexec_args")),
        iexec_input_files=[_as_text("iexec_input_files[]", item) for item in files],
        iexec_result_storage_provider=_as_text(
            "iexec_result_storage_provider", data.get("iexec_result_storage_provider")
        ),
        iexec_result_storage_proxy=_as_text(
            "iexec_result_storage_proxy", data.get("iexec_result_storage_proxy")
        ),
        iexec_result_encryption=_as_bool(
            "iexec_result_encryption", data.get("iexec_result_encryption")
        ),
        iexec_secrets={str(k): _as_text("iexec_secrets{}", v) for k, v in secrets.items()},
        bulk_cid=_as_text("bulk_cid", data.get("bulk_cid")),
    )
