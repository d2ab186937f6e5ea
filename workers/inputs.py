"""What iexec-worker does before an app runs: deal params, args, input files, dataset, env.

Each function mirrors the iexec-worker / iexec-commons code named in its docstring, so an
app written and tested against the official worker sees the same ``/iexec_in`` files, the
same arguments and the same environment here. Where this module deliberately differs,
the docstring says so and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3

log = logging.getLogger(__name__)

IEXEC_IN = "/iexec_in"
IEXEC_OUT = "/iexec_out"
ZERO_ADDRESS = "0x" + "0" * 40
# iexec-commons-poco MultiAddressHelper.IPFS_GATEWAYS, tried in this order
IPFS_GATEWAYS: tuple[str, ...] = (
    "https://ipfs-gateway.v8-bellecour.iex.ec",
    "https://gateway.ipfs.io",
    "https://gateway.pinata.cloud",
)
_CHUNK = 64 * 1024
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")


class InputError(Exception):
    """Base of the errors raised while preparing an app's inputs. Never retried blindly:
    the same deal gives the same args, and a failed download is the requester's data."""

    retryable = False


class ArgsError(InputError):
    """``iexec_args`` cannot be split into arguments (unbalanced quotes)."""


class DataDownloadError(InputError):
    """An input file or the dataset could not be fetched or failed its checks.

    ``url`` names what was being fetched, so the replicate's failure says which input broke.
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


# --- deal params ---------------------------------------------------------------


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


# --- args ------------------------------------------------------------------------


def split_args(text: str | None) -> list[str]:
    """Split ``iexec_args`` like Maven ``CommandLineUtils.translateCommandline``, which
    iexec-commons-containers ``ArgsUtils`` uses to build the container's Cmd.

    Only the space character separates arguments (tabs and newlines are ordinary
    characters); single or double quotes group text and are removed; the other kind of
    quote inside a quoted part is literal; there is no backslash escape; empty arguments
    (``""``) are dropped.

    Deliberate difference: unbalanced quotes raise :class:`ArgsError`. iexec-worker
    catches Maven's exception and runs the app with *no* arguments at all, which silently
    computes something the requester did not ask for; failing says why instead.
    """
    if not text:
        return []
    args: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for char in text:
        if quote is not None:
            if char == quote:
                quote = None
            else:
                current.append(char)
        elif char in ("'", '"'):
            quote = char
        elif char == " ":
            if current:
                args.append("".join(current))
                current = []
        else:
            current.append(char)
    if quote is not None:
        raise ArgsError(f"unbalanced {quote} quote in iexec_args: {text!r}")
    if current:
        args.append("".join(current))
    return args


# --- downloads -----------------------------------------------------------------

Fetch = Callable[[str, float], Iterator[bytes]]
"""``fetch(url, timeout)`` yields the body of ``url`` in chunks, or raises
:class:`DataDownloadError`. The size and total-time limits are enforced by the caller."""


def input_file_name(url: str) -> str:
    """The name iexec-worker gives a downloaded input file: ``0x`` + sha256 of the URL text
    (``FileHashUtils.createFileNameFromUri``), not of the content nor the URL's basename."""
    return "0x" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def http_fetch(url: str, timeout: float) -> Iterator[bytes]:
    """The default :data:`Fetch`: a streaming GET with ``requests``.

    Chunks are read with ``read1`` (whatever has arrived, up to 64 KiB) rather than
    ``iter_content``, which waits for a full chunk: a server that drips a byte at a time
    would otherwise never give the caller a chance to apply its total deadline.
    ``timeout`` bounds the connection and each wait for data.
    ``Accept-Encoding: identity`` keeps the bytes exactly as served (as Java's
    ``URL.openStream`` in iexec-worker), so the size limit and checksums apply to them.
    """
    try:
        with requests.get(
            url,
            stream=True,
            timeout=timeout,
            headers={"Accept-Encoding": "identity", "User-Agent": "workerpool-worker"},
        ) as response:
            if not 200 <= response.status_code < 300:
                raise DataDownloadError(
                    f"could not download {url}: HTTP {response.status_code} {response.reason}",
                    url,
                )
            while chunk := response.raw.read1(_CHUNK, decode_content=True):
                yield chunk
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise DataDownloadError(
            f"could not download {url}: {type(exc).__name__}: {exc}", url
        ) from exc


def _check_http_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise DataDownloadError(
            f"cannot download {url!r}: only http:// and https:// URLs are supported", url
        )


def _download(url: str, dest: Path, *, max_bytes: int, timeout: float, fetch: Fetch) -> int:
    """Fetch ``url`` into ``dest`` (through ``dest.part``), at most ``max_bytes`` bytes and
    ``timeout`` seconds in total; returns the size. Nothing is left behind on failure."""
    _check_http_url(url)
    part = dest.with_name(dest.name + ".part")
    deadline = time.monotonic() + timeout
    size = 0
    chunks = fetch(url, timeout)
    try:
        with open(part, "wb") as out:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise DataDownloadError(
                        f"could not download {url}: larger than the limit of {max_bytes} bytes",
                        url,
                    )
                if time.monotonic() > deadline:
                    raise DataDownloadError(
                        f"could not download {url}: took longer than {timeout:g} s", url
                    )
                out.write(chunk)
        os.replace(part, dest)
    except DataDownloadError:
        part.unlink(missing_ok=True)
        raise
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise DataDownloadError(f"could not download {url}: {exc}", url) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    return size


def download_inputs(
    urls: Sequence[str],
    input_dir: Path,
    *,
    max_bytes: int,
    timeout: float,
    fetch: Fetch | None = None,
) -> list[str]:
    """Download the deal's ``iexec_input_files`` into ``input_dir``; return their names, in
    order (the app finds them as ``IEXEC_INPUT_FILE_NAME_1..n``).

    Like iexec-worker (``DataService.downloadStandardInputFiles``) the first failure stops
    everything; unlike it, only http(s) URLs are accepted, and each file is bounded by
    ``max_bytes`` and ``timeout`` (total seconds), so a requester cannot fill the worker's
    disk or hold it forever. Failures are not retried here.
    """
    fetch = fetch or http_fetch
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    done: set[str] = set()
    for url in urls:
        if not url:
            raise DataDownloadError("an input file URL of the deal is empty", url)
        name = input_file_name(url)
        names.append(name)
        if name in done:  # same URL twice: same file name, one download
            continue
        size = _download(url, input_dir / name, max_bytes=max_bytes, timeout=timeout, fetch=fetch)
        done.add(name)
        log.info("input file %s downloaded (%d bytes) as %s", url, size, name)
    return names


def dataset_file_name(dataset_address: str) -> str:
    """The dataset's file name in ``/iexec_in``: its address (iexec-worker), lower-cased so
    that the file and ``IEXEC_DATASET_FILENAME`` agree whatever casing the caller has."""
    if not _ADDRESS_RE.match(dataset_address or ""):
        raise ValueError(f"not a dataset address: {dataset_address!r}")
    return dataset_address.lower()


def _is_zero_hex(value: str) -> bool:
    digits = value[2:] if value.lower().startswith("0x") else value
    return set(digits) <= {"0"}


def download_dataset(
    multiaddr_or_url: str,
    checksum_hex: str,
    input_dir: Path,
    dataset_address: str,
    *,
    max_bytes: int,
    timeout: float,
    fetch: Fetch | None = None,
    ipfs_gateways: Sequence[str] = IPFS_GATEWAYS,
) -> str:
    """Download the deal's dataset into ``input_dir`` as ``<dataset address>``; return that name.

    As ``DataService.downloadStandardDataset``: an IPFS path (``/ipfs/<cid>``, the usual
    on-chain multiaddr) is fetched from each gateway in turn until one answers; any other
    value must be an http(s) URL. The file's sha256 must equal the on-chain checksum,
    except when the checksum is empty or all zeros (then a warning: nothing can be checked).
    A mismatch deletes the file and raises :class:`DataDownloadError`.
    """
    fetch = fetch or http_fetch
    input_dir = Path(input_dir)
    input_dir.mkdir(parents=True, exist_ok=True)
    name = dataset_file_name(dataset_address)
    dest = input_dir / name
    uri = (multiaddr_or_url or "").strip()
    if not uri:
        raise DataDownloadError(f"dataset {dataset_address} has no location on chain", uri)
    if uri.startswith(("/ipfs/", "/ipns/")):
        if not ipfs_gateways:
            raise DataDownloadError(f"cannot download {uri}: no IPFS gateway configured", uri)
        failures: list[str] = []
        for gateway in ipfs_gateways:
            url = gateway.rstrip("/") + uri
            try:
                _download(url, dest, max_bytes=max_bytes, timeout=timeout, fetch=fetch)
                break
            except DataDownloadError as exc:
                log.warning("dataset %s: gateway %s failed: %s", dataset_address, gateway, exc)
                failures.append(str(exc))
        else:
            raise DataDownloadError(
                f"could not download dataset {uri} from any IPFS gateway: " + "; ".join(failures),
                uri,
            )
    else:
        _download(uri, dest, max_bytes=max_bytes, timeout=timeout, fetch=fetch)

    expected = (checksum_hex or "").strip().lower()
    if not expected or _is_zero_hex(expected):
        log.warning("INSECURE: dataset %s has no on-chain checksum: not checked", dataset_address)
        return name
    if not expected.startswith("0x"):
        expected = "0x" + expected
    digest = hashlib.sha256()
    with open(dest, "rb") as data:
        for chunk in iter(lambda: data.read(_CHUNK), b""):
            digest.update(chunk)
    actual = "0x" + digest.hexdigest()
    if actual != expected:
        dest.unlink(missing_ok=True)
        raise DataDownloadError(
            f"checksum mismatch for dataset {dataset_address} from {uri}: "
            f"on-chain {expected}, downloaded file {actual}",
            uri,
        )
    return name


# --- environment -------------------------------------------------------------------


def app_env(
    *,
    deal_id: str,
    task_id: str,
    task_index: int,
    bot_first: int,
    bot_size: int,
    input_file_names: Sequence[str] = (),
    dataset_address: str | None = None,
) -> dict[str, str]:
    """The app's environment, as iexec-common ``IexecEnvUtils.getComputeStageEnvMap``.

    ``IEXEC_TASK_INDEX`` and ``IEXEC_BOT_TASK_INDEX`` are both the task's absolute index
    in the deal. ``IEXEC_INPUT_FILES_FOLDER`` and ``IEXEC_INPUT_FILE_NAME_1..n`` are set
    only when there are input files. URLs and checksums are not given to standard apps.

    Deliberate difference: with no dataset, iexec-worker still sets
    ``IEXEC_DATASET_FILENAME`` to the zero address, naming a file that does not exist;
    here it is set only when the deal has a dataset, so apps can test for it.
    ``IEXEC_DATASET_ADDRESS`` is always set (the zero address when there is none).
    """
    has_dataset = dataset_address is not None and not _is_zero_hex(dataset_address)
    env: dict[str, str] = {
        "IEXEC_DEAL_ID": deal_id,
        "IEXEC_TASK_INDEX": str(task_index),
        "IEXEC_TASK_ID": task_id,
        "IEXEC_IN": IEXEC_IN,
        "IEXEC_OUT": IEXEC_OUT,
        "IEXEC_DATASET_ADDRESS": (
            dataset_file_name(dataset_address)
            if has_dataset and dataset_address is not None
            else ZERO_ADDRESS
        ),
    }
    if has_dataset and dataset_address is not None:
        env["IEXEC_DATASET_FILENAME"] = dataset_file_name(dataset_address)
    env["IEXEC_BOT_SIZE"] = str(bot_size)
    env["IEXEC_BOT_FIRST_INDEX"] = str(bot_first)
    env["IEXEC_BOT_TASK_INDEX"] = str(task_index)
    if input_file_names:
        env["IEXEC_INPUT_FILES_FOLDER"] = IEXEC_IN
    env["IEXEC_INPUT_FILES_NUMBER"] = str(len(input_file_names))
    for number, name in enumerate(input_file_names, start=1):
        env[f"IEXEC_INPUT_FILE_NAME_{number}"] = name
    return env
