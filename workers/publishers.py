"""Result publishers: where a worker puts a task's result archive, and where the API finds it.

A task's result is a zip archive. The worker that wins the upload publishes it and the
scheduler finalizes the task on chain with a *results link* that says where it lives
(:mod:`poco.results`).

Two publishers implement :class:`ResultPublisher`:

* :class:`IpfsPublisher` — production: the Kubo RPC API (``/api/v0``). In dev and CI the
  daemon is js-ipfs from npm (no Kubo binary installs on these machines), which serves the
  same API and computes the same CIDs. The archive is added as one file with ``cid-version=0``
  and the default chunker, and pinned, so the location is ``/ipfs/Qm…`` as iexec expects.
* :class:`LocalPublisher` — the one-process demo and deployments without IPFS: files in a
  folder the status API serves under ``/results/<taskid>.zip``. Its link is
  ``{ "storage": "local", "location": "<base_url>/results/<taskid>.zip" }`` with an
  *absolute* URL: iexec clients only know ``ipfs``, so a local link has to be something any
  HTTP client can fetch without knowing the pool's address.

Why plain HTTP (requests) to the RPC API and not ipfshttpclient: the project depends on
ipfshttpclient 0.7.0, its last release (2021), and the plan was to use its API where it works.
It does not work as shipped: ``ipfshttpclient.connect()`` refuses every daemon from Kubo 0.8
on (js-ipfs 0.66.1 reports 0.18.1); building ``Client("/ip4/…/http")`` directly skips that
check, but every request then passes urllib3 2's deprecated ``strict=`` argument (a
``FutureWarning`` today, an error in urllib3 3), and its errors would still need mapping to our
retryable/permanent split. The five calls we need (``add``, ``cat``, ``pin/ls``, ``id``,
``version``) are a few lines each over requests, which is already a dependency, and give us
control over what matters with js-ipfs: a Content-Type on every multipart part, and a
server-side ``timeout=`` on ``cat``/``pin`` (a CID the node does not hold otherwise hangs until
the HTTP timeout). One code path, tested against a real daemon, rather than two.

Errors are :class:`PublishError` with ``retryable`` set: the daemon down, a timeout or a 5xx
is worth retrying later; a 4xx, an invalid location or a refused task id is not.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import requests

log = logging.getLogger(__name__)

IPFS = "ipfs"
LOCAL = "local"
STORAGE_KINDS = (IPFS, LOCAL)

_TASK_ID_RE = re.compile(r"0x[0-9a-fA-F]{64}")
# /ipfs/<cid>[/<path>]: base58btc CIDv0 (Qm…) or a multibase CIDv1; no spaces, quotes, '..'.
_IPFS_LOCATION_RE = re.compile(r"/ipfs/([A-Za-z0-9]{46,100})(/[A-Za-z0-9._~-]+)*")
_LOCAL_PATH_RE = re.compile(r"/results/(0x[0-9a-f]{64})\.zip")


class PublishError(Exception):
    """A result could not be published or fetched.

    ``retryable`` says whether the same call may succeed later (daemon down or slow, a 5xx)
    or never will (a 4xx from the daemon, an invalid task id or location): callers retry the
    first kind with backoff and fail the replicate on the second, never blindly.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def check_task_id(task_id: str) -> str:
    """The task id in lower case; refuses anything but ``0x`` + 64 hex digits.

    Task ids become file names (local publisher) and multipart file names (IPFS): refusing
    everything else rules out path traversal (``../``) and odd names once, for both.
    """
    if not isinstance(task_id, str) or not _TASK_ID_RE.fullmatch(task_id):
        raise PublishError(f"invalid task id {task_id!r}: expected 0x + 64 hex digits")
    return task_id.lower()


# --- the interface ------------------------------------------------------------------------


@runtime_checkable
class ResultPublisher(Protocol):
    """Where results go. Workers call :meth:`publish`; the API and tests call :meth:`fetch`."""

    storage: str
    """The ``storage`` value of the results link (``ipfs`` or ``local``)."""

    def publish(self, task_id: str, data: bytes) -> str:
        """Store a task's result archive; return its location (the link's ``location``).

        Publishing the same bytes again returns the same location (idempotent retries).
        """
        ...

    def fetch(self, location: str) -> bytes:
        """The bytes stored at a location this publisher returned."""
        ...

    def ping(self) -> None:
        """Raise :class:`PublishError` (retryable) when the storage cannot be reached."""
        ...


# --- IPFS ---------------------------------------------------------------------------------


class IpfsPublisher:
    """Results on IPFS through the Kubo RPC API (``POST /api/v0/...``), pinned, CIDv0.

    ``timeout`` (seconds) bounds every request; for ``cat`` and ``pin/ls`` it is also sent
    to the daemon as its own ``timeout=``, a little shorter than the HTTP one, so a CID the
    node does not hold ends with the daemon's answer instead of a hang. That daemon-side
    deadline covers the whole ``cat``, so size it for the largest result to read back.
    Archives are sent in one request body held in memory (results are bounded by
    ``WORKERPOOL_APP_OUTPUT_LIMIT_MB``). A publisher is cheap and connects lazily.
    """

    storage = IPFS

    def __init__(
        self,
        api_url: str,
        *,
        timeout: float = 30,
        session: requests.Session | None = None,
    ) -> None:
        if "://" not in api_url:
            raise ValueError(f"IPFS API URL {api_url!r} needs a scheme (http://host:port)")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.api_url = api_url.rstrip("/")
        self.timeout = float(timeout)
        self._session = session or requests.Session()

    def __repr__(self) -> str:
        return f"IpfsPublisher({self.api_url!r}, timeout={self.timeout:g})"

    def close(self) -> None:
        self._session.close()

    # -- ResultPublisher

    def publish(self, task_id: str, data: bytes) -> str:
        """Add and pin the archive (one file, CIDv0, default chunker); return ``/ipfs/<cid>``."""
        task_id = check_task_id(task_id)
        cid = self._add(f"{task_id}.zip", data, only_hash=False)
        log.info("published result of task %s: /ipfs/%s (%d bytes)", task_id, cid, len(data))
        return f"/ipfs/{cid}"

    def fetch(self, location: str) -> bytes:
        """The bytes at ``/ipfs/<cid>``; a CID the node cannot find ends in a retryable error."""
        self._check_location(location)
        response = self._post("cat", {"arg": location, **self._daemon_timeout()})
        return response.content

    def ping(self) -> None:
        """One ``version`` call: cheap, and proves the RPC API (not just the port) answers."""
        self.version()

    # -- more of the RPC API, for health checks and tests

    def version(self) -> str:
        """The daemon's version string (Kubo ``0.x.y``; js-ipfs reports its own)."""
        return str(self._post_json("version", {}).get("Version", ""))

    def peer_id(self) -> str:
        """The daemon's peer id (``/api/v0/id``)."""
        return str(self._post_json("id", {}).get("ID", ""))

    def cid_of(self, data: bytes) -> str:
        """The CID :meth:`publish` would return for ``data``, computed without storing it."""
        return self._add("result.zip", data, only_hash=True)

    def is_pinned(self, location: str) -> bool:
        """Whether the CID of ``location`` is pinned (recursively or directly) on the node."""
        cid = self._check_location(location)
        try:
            body = self._post_json("pin/ls", {"arg": cid, "type": "all", **self._daemon_timeout()})
        except PublishError as exc:
            # Kubo and js-ipfs both answer "not pinned" with an error message, not an empty list
            if "not pinned" in exc.message:
                return False
            raise
        return cid in (body.get("Keys") or {})

    # -- plumbing

    def _add(self, name: str, data: bytes, *, only_hash: bool) -> str:
        params = {
            "pin": "false" if only_hash else "true",
            "cid-version": "0",
            "only-hash": "true" if only_hash else "false",
            "progress": "false",
        }
        # js-ipfs rejects a multipart part without its own Content-Type
        files = {"file": (name, data, "application/octet-stream")}
        response = self._post("add", params, files=files)
        # the answer is newline-delimited JSON, one object per added file (here: one)
        hashes = []
        for line in response.text.splitlines():
            if line.strip():
                try:
                    hashes.append(json.loads(line)["Hash"])
                except (ValueError, KeyError, TypeError):
                    continue
        if not hashes:
            raise PublishError(
                f"IPFS add at {self.api_url} answered without a Hash: {response.text[:200]!r}",
                retryable=True,
            )
        return str(hashes[-1])

    def _daemon_timeout(self) -> dict[str, str]:
        # the daemon gives up a little before we do, so we read its error, not our timeout
        millis = max(int(self.timeout * 1000) - 1000, int(self.timeout * 500))
        return {"timeout": f"{millis}ms"}

    @staticmethod
    def _check_location(location: str) -> str:
        match = _IPFS_LOCATION_RE.fullmatch(location or "")
        if not match:
            raise PublishError(f"not an IPFS location: {location!r} (expected /ipfs/<cid>)")
        return match.group(1)

    def _post_json(self, command: str, params: dict[str, str]) -> dict[str, Any]:
        response = self._post(command, params)
        try:
            body = response.json()
        except ValueError as exc:
            raise PublishError(
                f"IPFS {command} at {self.api_url} answered non-JSON: {response.text[:200]!r}",
                retryable=True,
            ) from exc
        return body if isinstance(body, dict) else {}

    def _post(
        self, command: str, params: dict[str, str], *, files: dict[str, Any] | None = None
    ) -> requests.Response:
        url = f"{self.api_url}/api/v0/{command}"
        try:
            response = self._session.post(
                url,
                params=params,
                files=files,
                timeout=(min(self.timeout, 5.0), self.timeout),
            )
        except requests.Timeout as exc:
            raise PublishError(
                f"IPFS {command} at {self.api_url}: no answer within {self.timeout:g}s",
                retryable=True,
            ) from exc
        except requests.ConnectionError as exc:
            raise PublishError(
                f"IPFS API unreachable at {self.api_url} ({command}): {_root_cause(exc)}",
                retryable=True,
            ) from exc
        except requests.RequestException as exc:
            raise PublishError(f"IPFS {command} at {self.api_url} failed: {exc}") from exc
        if response.status_code >= 400:
            raise PublishError(
                f"IPFS {command} at {self.api_url}: HTTP {response.status_code}: "
                f"{_error_message(response)}",
                # Kubo answers most command errors (a timeout, a block not found) with 500
                retryable=response.status_code >= 500,
            )
        return response


def _error_message(response: requests.Response) -> str:
    """The daemon's ``{"Message": ...}`` when it sent one, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason
    if isinstance(body, dict) and body.get("Message"):
        return str(body["Message"])
    return str(body)[:200]


def _root_cause(exc: BaseException) -> str:
    """The innermost error (e.g. ``[Errno 111] Connection refused``), not urllib3's wrappers."""
    root = exc
    while (inner := root.__cause__ or root.__context__) is not None:
        root = inner
    text = str(root)
    # urllib3: "<HTTPConnection object at 0x…>: Failed to establish a new connection: [Errno …"
    return text.split(": ", 1)[1] if text.startswith("<") and ": " in text else text


# --- local files ---------------------------------------------------------------------------


class LocalPublisher:
    """Results as files in ``directory``, served by the status API at ``/results/<id>.zip``.

    For the one-process demo and pools without IPFS. Workers and the API must share the
    folder. Files are written to a temporary name and renamed, so the API never serves a
    half-written archive and a retried upload simply replaces the file.
    """

    storage = LOCAL

    def __init__(self, directory: Path | str, base_url: str) -> None:
        if "://" not in base_url:
            raise ValueError(f"base URL {base_url!r} must be absolute (http://host:port)")
        self.directory = Path(directory)
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"LocalPublisher({str(self.directory)!r}, {self.base_url!r})"

    def path(self, task_id: str) -> Path:
        """The file of a task's result (the API serves it; it may not exist yet)."""
        return self.directory / f"{check_task_id(task_id)}.zip"

    def url_path(self, task_id: str) -> str:
        """The API route of a task's result, relative to ``base_url``."""
        return f"/results/{check_task_id(task_id)}.zip"

    # -- ResultPublisher

    def publish(self, task_id: str, data: bytes) -> str:
        """Write ``<directory>/<taskid>.zip`` atomically; return its absolute URL."""
        target = self.path(task_id)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".zip")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o644)  # mkstemp makes 0600; the API may run as another user
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            # a full or read-only disk may be fixed by an operator: worth retrying later
            raise PublishError(f"cannot write result {target}: {exc}", retryable=True) from exc
        log.info("published result of task %s: %s (%d bytes)", task_id, target, len(data))
        return f"{self.base_url}{self.url_path(task_id)}"

    def fetch(self, location: str) -> bytes:
        """The bytes of a location :meth:`publish` returned (absolute, or ``/results/…``)."""
        path = location
        if location.startswith(self.base_url + "/"):
            path = location[len(self.base_url) :]
        match = _LOCAL_PATH_RE.fullmatch(path.lower())
        if not match:
            raise PublishError(
                f"not a location of this local publisher: {location!r} "
                f"(expected {self.base_url}/results/<taskid>.zip)"
            )
        target = self.path(match.group(1))
        try:
            return target.read_bytes()
        except FileNotFoundError as exc:
            raise PublishError(f"no result at {location}: {target} does not exist") from exc
        except OSError as exc:
            raise PublishError(f"cannot read result {target}: {exc}", retryable=True) from exc

    def ping(self) -> None:
        """The folder exists (or can be created) and is writable."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PublishError(f"results folder {self.directory}: {exc}", retryable=True) from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PublishError(f"results folder {self.directory} is not writable", retryable=True)


# --- factory ----------------------------------------------------------------------------------


def make_publisher(
    kind: str,
    *,
    ipfs_api_url: str,
    local_dir: Path | str,
    base_url: str,
    timeout: float = 30,
) -> ResultPublisher:
    """The publisher for ``kind`` (``WORKERPOOL_RESULT_STORAGE``: ``ipfs`` or ``local``).

    Takes plain values rather than the settings object so that settings stay the one place
    that reads the environment; nothing connects here (call :meth:`ResultPublisher.ping`).
    """
    normalized = kind.strip().lower()
    if normalized == IPFS:
        return IpfsPublisher(ipfs_api_url, timeout=timeout)
    if normalized == LOCAL:
        if not str(local_dir).strip():
            raise ValueError("the local result publisher needs a folder (local_dir)")
        return LocalPublisher(Path(local_dir), base_url)
    raise ValueError(f"unknown result storage {kind!r}: expected one of {', '.join(STORAGE_KINDS)}")
