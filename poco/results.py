"""The results link: the bytes finalize writes on chain to say where a task's result lives,
in iexec's own format (iexec-commons-poco ``ResultUtils``/``IpfsResultUtils``)::

    { "storage": "ipfs", "location": "/ipfs/QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o" }

:func:`result_link` writes exactly that string (iexec builds it with ``String.format``, spaces
included, so links written by us and by iexec-worker are byte-identical on chain);
:func:`parse_result_link` accepts any JSON object with those two keys.
"""

from __future__ import annotations

import json
import re

_HEX = re.compile(r"[0-9a-fA-F]*")

# iexec-commons-poco: String.format("{ \"storage\": \"%s\", \"location\": \"%s\" }", ...)
_RESULT_LINK_FORMAT = '{{ "storage": "{storage}", "location": "{location}" }}'


def result_link(storage: str, location: str) -> str:
    """The results link exactly as iexec writes it, so on-chain bytes match iexec-worker's.

    iexec formats it with ``String.format`` and escapes nothing; a value holding a quote, a
    backslash or a control character would give invalid JSON, so it is refused here instead.
    """
    for name, value in (("storage", storage), ("location", location)):
        if not value or any(c in value for c in '"\\') or any(ord(c) < 0x20 for c in value):
            raise ValueError(f"result link {name} {value!r} is empty or not JSON-safe")
    return _RESULT_LINK_FORMAT.format(storage=storage, location=location)


def parse_result_link(data: bytes | str) -> tuple[str, str]:
    """``(storage, location)`` of a results link; any JSON spacing or key order is accepted.

    Raises ValueError when ``data`` is not a JSON object with string ``storage`` and
    ``location`` (e.g. a TEE task's callback data, which is not a link).
    """
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"result link is not UTF-8: {exc}") from exc
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"result link is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError("result link is not a JSON object")
    storage, location = obj.get("storage"), obj.get("location")
    if not isinstance(storage, str) or not isinstance(location, str) or not storage:
        raise ValueError("result link needs string 'storage' and 'location'")
    return storage, location


def callback_bytes(callback_data: str) -> bytes:
    """The bytes of a task's ``callback-data`` (the ``resultsCallback`` of ``finalize``): the
    one parser of the pool, used by the worker for the result digest and by whoever sends
    ``finalize`` or ``contributeAndFinalize``, so what was hashed is what is sent.

    As web3j's ``Numeric.hexStringToByteArray`` (iexec-worker): an optional ``0x``, and an
    odd number of digits reads the first digit as a byte of its own (``0x123`` is
    ``01 23``). "" (or "0x") is no bytes. Anything else raises ValueError.
    """
    digits = callback_data[2:] if callback_data.startswith("0x") else callback_data
    if not _HEX.fullmatch(digits):
        raise ValueError(f"callback-data is not hexadecimal: {callback_data[:80]!r}")
    if len(digits) % 2:
        digits = "0" + digits
    return bytes.fromhex(digits)
