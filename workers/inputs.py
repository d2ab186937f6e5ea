"""What iexec-worker does before an app runs: deal params, args, input files, dataset, env.

Each function mirrors the iexec-worker / iexec-commons code named in its docstring, so an
app written and tested against the official worker sees the same ``/iexec_in`` files, the
same arguments and the same environment here. Where this module deliberately differs,
the docstring says so and why.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import certifi
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
    ``node_fault`` is set when the failure is this node's (its disk), not the requester's
    URL, server or data: the replicate is then given to another node instead of ending in
    an error result.
    """

    def __init__(self, message: str, url: str = "", *, node_fault: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.node_fault = node_fault


class ChecksumError(DataDownloadError):
    """The dataset's sha256 differs from its on-chain checksum."""


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

MAX_REDIRECTS = 5
# each wait for the server (connect, or the next bytes) is bounded by this, and by the time left
READ_TIMEOUT = 60.0
# a download that fails on the server's side (no connection, HTTP 5xx or 429) is tried again
# this many times, a second apart, within the task's time: a glitch of the requester's server
# should not decide the task's result
DOWNLOAD_ATTEMPTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
# NAT64 (RFC 6052): an IPv6 address that a translator turns into the IPv4 address it embeds
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
METADATA_ADDRESSES = frozenset({"169.254.169.254", "fd00:ec2::254", "100.100.100.200"})


def input_file_name(url: str) -> str:
    """The name iexec-worker gives a downloaded input file: ``0x`` + sha256 of the URL text
    (``FileHashUtils.createFileNameFromUri``), not of the content nor the URL's basename."""
    return "0x" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def non_global(address: str) -> str:
    """Why ``address`` (an IP address) must not be fetched from, or "" when it is a global
    unicast address. IPv4 addresses inside IPv6 ones (mapped, NAT64, 6to4, Teredo) are
    judged as the IPv4 address they reach."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip.teredo is not None:
            ip = ip.teredo[1]
    if str(ip) in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (ip.is_loopback, "a loopback address"),
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),
        (ip.is_private, "a private address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a global address"),
    )
    return next((why for bad, why in checks if bad), "")


@dataclass(frozen=True)
class AddressPolicy:
    """Where downloads may connect. By default only to global addresses: an input URL must
    not reach the node's loopback (the pool's Redis, its chain node), its private network or
    a cloud metadata service, whose answers the app could publish in its result.
    ``allow_private`` lifts that (devnets, tests); ``private_hosts`` (``host:port``) lets
    named servers of the pool's own network through while every other stays refused."""

    allow_private: bool = False
    private_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, allow_private: bool, private_hosts: Sequence[str]) -> AddressPolicy:
        return cls(allow_private, frozenset(h.strip().lower() for h in private_hosts if h))

    def pick(self, url: str, host: str, port: int, addresses: Sequence[str]) -> str:
        """The address to connect to for ``host:port``, among those it resolved to; the
        requester's error (:class:`DataDownloadError`) when none may be used."""
        if not addresses:
            raise DataDownloadError(f"could not download {url}: {host} has no address", url)
        if self.allow_private or f"{host.lower()}:{port}" in self.private_hosts:
            return addresses[0]
        reasons = []
        for address in addresses:
            why = non_global(address)
            if not why:
                return address
            reasons.append(why if address == host.strip("[]") else f"resolves to {address}, {why}")
        raise DataDownloadError(
            f"refused to download {url}: {host} is {'; '.join(reasons)} (input files and "
            "datasets are fetched from global addresses only)",
            url,
        )


STRICT = AddressPolicy()


def resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host.strip("[]")).compressed]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise DataDownloadError(f"cannot resolve {host}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _target(url: str) -> tuple[str, str, int, str]:
    """``(scheme, host, port, path?query)`` of an http(s) URL; DataDownloadError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise DataDownloadError(f"cannot download {url!r}: {exc}", url) from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise DataDownloadError(
            f"cannot download {url!r}: only http:// and https:// URLs are supported", url
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, parts.hostname, port or (443 if scheme == "https" else 80), path


def http_fetch(
    url: str,
    timeout: float,
    *,
    policy: AddressPolicy = STRICT,
) -> Iterator[bytes]:
    """The default :data:`Fetch`: a GET that connects only where ``policy`` allows.

    Each hop is checked: the host is resolved once, the address is checked, and the
    connection goes to that very address (TLS still checks the host name), so a name that
    resolves elsewhere the second time (DNS rebinding) changes nothing; a redirect (at most
    :data:`MAX_REDIRECTS`) is a new hop, checked the same way. No proxy from the environment.
    Chunks are read with ``read1`` (whatever has arrived, up to 64 KiB), so a server that
    drips a byte at a time never keeps the caller from applying its total deadline.
    ``timeout`` bounds the connection and each wait for data. ``Accept-Encoding: identity``
    keeps the bytes exactly as served (as Java's ``URL.openStream`` in iexec-worker), so the
    size limit and checksums apply to them.
    """
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, path = _target(current)
        address = policy.pick(current, host, port, resolve(host, port))
        netloc = urlsplit(current).netloc.rsplit("@", 1)[-1]
        wait = urllib3.Timeout(connect=timeout, read=timeout)
        pool: urllib3.HTTPConnectionPool
        if scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                address,
                port,
                timeout=wait,
                retries=False,
                cert_reqs="CERT_REQUIRED",
                ca_certs=certifi.where(),
                server_hostname=host,
                assert_hostname=host,
            )
        else:
            pool = urllib3.HTTPConnectionPool(address, port, timeout=wait, retries=False)
        try:
            response = pool.urlopen(
                "GET",
                path,
                headers={
                    "Host": netloc,
                    "Accept-Encoding": "identity",
                    "User-Agent": "workerpool-worker",
                },
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            pool.close()
            raise DataDownloadError(
                f"could not download {current}: {type(exc).__name__}: {exc}", url
            ) from exc
        try:
            location = response.headers.get("Location")
            if response.status in _REDIRECTS and location:
                current = urljoin(current, location)
                continue
            if not 200 <= response.status < 300:
                raise _HttpStatus(
                    f"could not download {current}: HTTP {response.status} {response.reason}",
                    url,
                    status=response.status,
                )
            while chunk := response.read1(_CHUNK):
                yield chunk
            return
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise DataDownloadError(
                f"could not download {current}: {type(exc).__name__}: {exc}", url
            ) from exc
        finally:
            response.release_conn()
            pool.close()
    raise DataDownloadError(f"could not download {url}: more than {MAX_REDIRECTS} redirects", url)


class _HttpStatus(DataDownloadError):
    def __init__(self, message: str, url: str, *, status: int) -> None:
        super().__init__(message, url)
        self.status = status


def _check_http_url(url: str) -> None:
    _target(url)


@dataclass
class DownloadBudget:
    """What a task's downloads may take together: ``max_file`` bytes each, ``max_total``
    bytes in all (input files and dataset), and the time until ``deadline`` (a
    ``time.monotonic()`` value: the task's time, shared with the app that runs after)."""

    max_file: int
    max_total: int
    deadline: float
    used: int = 0

    @classmethod
    def of(cls, max_bytes: int, timeout: float, max_total: int | None = None) -> DownloadBudget:
        return cls(max_bytes, max_total or max_bytes, time.monotonic() + timeout)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _retryable(exc: DataDownloadError) -> bool:
    """A failure on the server's side that may pass: no connection, or HTTP 5xx / 429."""
    if isinstance(exc, _HttpStatus):
        return exc.status >= 500 or exc.status == 429
    return exc.__cause__ is not None and not isinstance(exc, ChecksumError)


def _download(url: str, dest: Path, budget: DownloadBudget, fetch: Fetch) -> int:
    """Fetch ``url`` into ``dest`` within ``budget`` (tried again after a failure of the
    server's side while time is left); returns the size. Nothing is left behind on failure."""
    _check_http_url(url)
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        try:
            return _download_once(url, dest, budget, fetch)
        except DataDownloadError as exc:
            if exc.node_fault or attempt == DOWNLOAD_ATTEMPTS or not _retryable(exc):
                raise
            if budget.left() < 2.0:
                raise
            log.warning("download of %s failed (%s): trying again", url, exc)
            time.sleep(1.0)
    raise AssertionError("unreachable")


def _download_once(url: str, dest: Path, budget: DownloadBudget, fetch: Fetch) -> int:
    part = dest.with_name(dest.name + ".part")
    left = budget.left()
    if left <= 0:
        raise DataDownloadError(
            f"could not download {url}: no time left (the task's time is used up)", url
        )
    size = 0
    chunks = fetch(url, min(READ_TIMEOUT, left))
    try:
        try:
            out = open(part, "wb")  # noqa: SIM115 (closed below, errors told apart)
        except OSError as exc:
            raise DataDownloadError(f"could not store {url}: {exc}", url, node_fault=True) from exc
        with out:
            for chunk in chunks:
                size += len(chunk)
                if size > budget.max_file:
                    raise DataDownloadError(
                        f"could not download {url}: larger than the limit of "
                        f"{budget.max_file} bytes",
                        url,
                    )
                if budget.used + size > budget.max_total:
                    raise DataDownloadError(
                        f"could not download {url}: the task's inputs are larger than the "
                        f"limit of {budget.max_total} bytes in all",
                        url,
                    )
                if budget.left() < 0:
                    raise DataDownloadError(
                        f"could not download {url}: took longer than the time left for the task",
                        url,
                    )
                try:
                    out.write(chunk)
                except OSError as exc:  # disk full: the node's, not the requester's
                    raise DataDownloadError(
                        f"could not store {url}: {exc}", url, node_fault=True
                    ) from exc
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise DataDownloadError(f"could not store {url}: {exc}", url, node_fault=True) from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    budget.used += size
    return size


def _fetcher(fetch: Fetch | None, policy: AddressPolicy) -> Fetch:
    if fetch is not None:
        return fetch
    return functools.partial(http_fetch, policy=policy)


def download_inputs(
    urls: Sequence[str],
    input_dir: Path,
    *,
    max_bytes: int,
    timeout: float | None = None,
    budget: DownloadBudget | None = None,
    max_files: int | None = None,
    fetch: Fetch | None = None,
    policy: AddressPolicy = STRICT,
) -> list[str]:
    """Download the deal's ``iexec_input_files`` into ``input_dir``; return their names, in
    order (the app finds them as ``IEXEC_INPUT_FILE_NAME_1..n``).

    Like iexec-worker (``DataService.downloadStandardInputFiles``) the first failure stops
    everything; unlike it, only http(s) URLs to addresses ``policy`` allows are fetched,
    at most ``max_files`` of them, and the downloads are bounded by ``budget`` (bytes per
    file and in all, the task's time; by default ``max_bytes`` each and ``timeout``
    seconds), so a requester cannot fill the worker's disk or hold it forever.
    """
    fetch = _fetcher(fetch, policy)
    if budget is None:
        budget = DownloadBudget.of(
            max_bytes, timeout or READ_TIMEOUT, max_bytes * max(1, len(urls))
        )
    if max_files is not None and len(urls) > max_files:
        raise DataDownloadError(
            f"the task lists {len(urls)} input files, more than this pool's limit of {max_files}"
        )
    input_dir = Path(input_dir)
    try:
        input_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDownloadError(f"cannot create {input_dir}: {exc}", node_fault=True) from exc
    names: list[str] = []
    done: set[str] = set()
    for url in urls:
        if not url:
            raise DataDownloadError("an input file URL of the deal is empty", url)
        name = input_file_name(url)
        names.append(name)
        if name in done:  # same URL twice: same file name, one download
            continue
        size = _download(url, input_dir / name, budget, fetch)
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
    timeout: float | None = None,
    budget: DownloadBudget | None = None,
    fetch: Fetch | None = None,
    ipfs_gateways: Sequence[str] = IPFS_GATEWAYS,
    policy: AddressPolicy = STRICT,
) -> str:
    """Download the deal's dataset into ``input_dir`` as ``<dataset address>``; return that name.

    As ``DataService.downloadStandardDataset``: an IPFS path (``/ipfs/<cid>``, the usual
    on-chain multiaddr) is fetched from each gateway in turn until one answers; any other
    value must be an http(s) URL. The file's sha256 must equal the on-chain checksum,
    except when the checksum is empty or all zeros (then a warning: nothing can be checked).
    A mismatch deletes the file and raises :class:`ChecksumError`. Downloads are bounded
    and checked as in :func:`download_inputs`.
    """
    fetch = _fetcher(fetch, policy)
    if budget is None:
        budget = DownloadBudget.of(max_bytes, timeout or READ_TIMEOUT)
    input_dir = Path(input_dir)
    try:
        input_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDownloadError(f"cannot create {input_dir}: {exc}", node_fault=True) from exc
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
                _download(url, dest, budget, fetch)
                break
            except DataDownloadError as exc:
                if exc.node_fault:
                    raise
                log.warning("dataset %s: gateway %s failed: %s", dataset_address, gateway, exc)
                failures.append(str(exc))
        else:
            raise DataDownloadError(
                f"could not download dataset {uri} from any IPFS gateway: " + "; ".join(failures),
                uri,
            )
    else:
        _download(uri, dest, budget, fetch)

    expected = (checksum_hex or "").strip().lower()
    if not expected or _is_zero_hex(expected):
        log.warning("INSECURE: dataset %s has no on-chain checksum: not checked", dataset_address)
        return name
    if not expected.startswith("0x"):
        expected = "0x" + expected
    digest = hashlib.sha256()
    try:
        with open(dest, "rb") as data:
            for chunk in iter(lambda: data.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as exc:
        raise DataDownloadError(f"cannot read {dest}: {exc}", uri, node_fault=True) from exc
    actual = "0x" + digest.hexdigest()
    if actual != expected:
        dest.unlink(missing_ok=True)
        raise ChecksumError(
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
