"""What iexec-worker does before an app runs: deal params, args, input files, dataset, env.

Each function mirrors the iexec-worker / iexec-commons code named in its docstring, so an
app written and tested against the official worker sees the same ``/iexec_in`` files, the
same arguments and the same environment here. Where this module deliberately differs,
the docstring says so and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from poco.params import DealParams
from poco.params import parse_deal_params as parse_deal_params

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


# --- deal params: parsed in poco.params (the API shows the command line from them) ---------


def refusal(params: DealParams, *, tee: bool, callback: bool) -> str:
    """Why this pool refuses to run a task with these ``params`` ("" when it runs it).

    iexec-worker v9 checks at start that a standard (non-TEE) task does not ask for
    ``iexec_result_encryption``: a standard worker cannot encrypt for the beneficiary and
    would otherwise publish the result in clear. The replicate ends START_FAILED with cause
    TASK_DESCRIPTION_INVALID before the app is pulled. A result storage provider other than
    IPFS is refused the same way here (deliberate difference: v9 runs the app, then fails
    the upload with RESULT_LINK_MISSING, after pushing the result to its proxy; refusing
    first runs nothing and publishes nothing). With a callback the result goes on chain, so
    the provider does not matter. An empty provider means IPFS (lenient: v9 would fail it,
    but the iExec SDK always writes ``ipfs`` for standard tasks).
    """
    if tee:
        return ""
    if params.iexec_result_encryption:
        return (
            "iexec_result_encryption needs a TEE task: a standard task's result cannot be "
            "encrypted for the beneficiary, so the task is refused (nothing ran, nothing "
            "was published)"
        )
    provider = params.iexec_result_storage_provider
    if not callback and provider not in ("", "ipfs"):
        return (
            f"iexec_result_storage_provider {provider[:40]!r} is not supported for standard "
            "tasks (only ipfs), so the task is refused (nothing ran, nothing was published)"
        )
    return ""


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
