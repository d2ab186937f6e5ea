"""Run one iExec app container, the way iexec-worker's compute stage does, but bounded.

The worker hands an :class:`AppRun` (image, args, env, host folders, limits) to a
:class:`ContainerRunner` and gets a :class:`RunOutcome` back. The runner,
:class:`DockerRunner`, talks to the Docker Engine through the Docker SDK (the tests' fake,
``testing.runner.FakeRunner``, plays the app without Docker).

What :class:`DockerRunner` guarantees, and why:

- **No network** by default (``network_mode="none"``): an app must not reach the worker's
  host, its wallet's RPC node or anything else; results must depend only on the inputs.
- **Least privilege**: never privileged, every capability dropped, ``no-new-privileges``.
  The user is left to the image (apps may expect root *inside* the container), which is
  safe because root without capabilities cannot escape it.
- **Bounded**: memory (swap included), CPU, pids, log size, wall time and the size of
  ``/iexec_out`` are limited; the root filesystem is read-only and ``/tmp`` a small tmpfs.
  The run blocks on one engine ``wait`` (so the end of the app is seen at once and the slot
  freed) until the time limit, and kills the container when the wall time is over. When
  the worker mounted a filesystem of the limit's size on the output folder
  (:attr:`AppRun.output_mounted`, :mod:`workers.mounts`), the app cannot write past the
  limit; the runner first checks that the engine binds that very filesystem. Otherwise a
  thread measures the output every ``poll_interval`` seconds and kills the container when
  it goes over its limit, so an app can overshoot by what it writes in one interval; the
  size is checked once more after the app exits, so an app that is too quick for the
  check is still flagged. An output that cannot be measured counts as over the limit.
- **Always removed**: the container is force-removed in a ``finally``, whatever happens
  (app failure, engine error, ``KeyboardInterrupt``, ``SystemExit``). A container left by
  a worker that crashed is removed by name before the next run of the same task, and
  :meth:`DockerRunner.remove_leftovers` removes them all by label at start-up.

The caller owns the host folders: after a run flagged ``output_too_large`` the output
folder still holds what the app wrote, and it is up to the caller to delete it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import requests

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

log = logging.getLogger(__name__)

MB = 1024 * 1024
IEXEC_IN = "/iexec_in"
IEXEC_OUT = "/iexec_out"
TASK_LABEL = "workerpool.task"
DEFAULT_PIDS_LIMIT = 512
DEFAULT_LOG_LIMIT_BYTES = 10 * MB
DEFAULT_TMP_BYTES = 64 * MB
# a file dockerd puts into /iexec_out before the app starts, to check it binds the folder the
# worker mounted (a worker in a container without shared mount propagation would not)
PROBE_NAME = ".workerpool-mount-probe"
LOG_TAIL_BYTES = 4096
# stdout / stderr kept for stdout.txt / stderr.txt and status reports: iexec-core tails
# the logs it stores to 100,000 characters, so more would be dropped upstream anyway.
DEFAULT_MAX_LOG_BYTES = 100_000
# lines asked from the engine; the byte bound above is applied after
_LOG_TAIL_LINES = 20_000
_KILL_WAIT_SECONDS = 30.0
# shortest wait on the engine (a request per wait: never spin)
_MIN_WAIT_SECONDS = 0.01
_REMOVE_ATTEMPTS = 3
# Docker's own rule for container names
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
# Docker refuses a memory limit under 6 MB
_MIN_MEMORY_BYTES = 6 * MB


class RunnerError(Exception):
    """The container could not be run at all (not: the app failed; that is a :class:`RunOutcome`).

    ``retryable`` tells the caller whether the same run may succeed later on this worker.
    """

    retryable = False


class AppImageError(RunnerError):
    """The app image is not on this worker and cannot be pulled.

    ``node_fault`` says whose failure it is. The app's (the reference is invalid, the
    registry says the image or its manifest does not exist, or refuses it): pulling again
    anywhere fails the same way, and the replicate ends in an error result
    (APP_IMAGE_DOWNLOAD_FAILED). The node's (the registry is unreachable from here, rate-limits
    this node or fails, the node's disk is full): another node may succeed."""

    def __init__(self, message: str, *, node_fault: bool = False) -> None:
        super().__init__(message)
        self.node_fault = node_fault


# what the Docker Engine says when the registry itself refuses the reference: the image (or
# that tag, or that platform) does not exist, or may not be pulled
_IMAGE_ABSENT = (
    "manifest unknown",
    "not found",
    "repository does not exist",
    "pull access denied",
    "denied:",
    "unauthorized",
    "invalid reference format",
    "no matching manifest",
    "name unknown",
)


def image_error_is_the_apps(status: int | None, explanation: str) -> bool:
    """Whether the Docker Engine's answer to a pull (HTTP ``status``, ``explanation``) means
    the image cannot be had anywhere (the app's fault) rather than from here, now (the
    node's: rate limit, registry down or unreachable, disk full)."""
    if status in (400, 401, 403, 404):
        return True
    text = explanation.lower()
    if any(word in text for word in ("toomanyrequests", "no space left", "rate limit")):
        return False
    return any(word in text for word in _IMAGE_ABSENT)


class EngineError(RunnerError):
    """The Docker Engine did not answer (socket gone, daemon restarting): nothing about the
    app is known, so the step may be retried once the engine is back."""

    retryable = True


# what the engine says when the image's entrypoint or command cannot be run
_APP_START_ERRORS = (
    "executable file not found",
    "no such file or directory",
    "permission denied",
    "exec format error",
    "not a directory",
)


class OutputMountError(EngineError):
    """The engine binds another folder than the one the worker mounted for the output."""

    retryable = False


def _fmt_bytes(count: int) -> str:
    """A byte count in the unit people configure limits in (MB = 2**20 bytes)."""
    if count >= MB and count % MB == 0:
        return f"{count // MB} MB"
    if count >= MB:
        return f"{count / MB:.1f} MB"
    return f"{count} bytes"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:g} s"


@dataclass
class AppRun:
    """Everything needed to run one task's app container, decided by the worker beforehand.

    ``input_dir`` is mounted read-only at ``/iexec_in`` and ``output_dir`` read-write at
    ``/iexec_out`` (both host paths, created if missing). ``env`` is the app environment
    (see :func:`workers.inputs.app_env`). ``args`` is the already split ``iexec_args``;
    an empty list keeps the image's own CMD. ``timeout`` is wall time in seconds;
    ``nano_cpus`` 0 means no CPU limit. ``name`` defaults to ``wp-<task_id[:18]>``.
    """

    task_id: str
    deal_id: str
    task_index: int
    bot_first: int
    bot_size: int
    image: str
    args: list[str]
    input_dir: Path
    output_dir: Path
    env: dict[str, str]
    timeout: float
    memory_bytes: int
    nano_cpus: int
    output_limit_bytes: int
    pids_limit: int = DEFAULT_PIDS_LIMIT
    log_limit_bytes: int = DEFAULT_LOG_LIMIT_BYTES
    network: bool = False
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    # the app's root filesystem is read-only; /tmp is a tmpfs of this size
    tmp_bytes: int = DEFAULT_TMP_BYTES
    # ``output_dir`` is a filesystem of its own sized to the limit (a tmpfs the worker
    # mounted): the limit is then the filesystem's, the app cannot write past it
    output_mounted: bool = False
    # a TEE stage's container (workers/tee.py): pre-compute writes /iexec_in, and both stages
    # run on the Docker network named here (they reach the node's enclave API)
    input_writable: bool = False
    network_mode: str = ""

    def __post_init__(self) -> None:
        self.input_dir = Path(self.input_dir)
        self.output_dir = Path(self.output_dir)
        if not self.name:
            self.name = f"wp-{self.task_id[:18]}"
        # Refused here rather than by the engine, so the message says which field is wrong.
        if not _NAME_RE.match(self.name):
            raise ValueError(f"invalid container name {self.name!r} (allowed: [a-zA-Z0-9_.-])")
        if not self.image:
            raise ValueError("AppRun.image is empty")
        if self.timeout <= 0:
            raise ValueError(f"AppRun.timeout must be > 0 seconds, got {self.timeout}")
        if self.memory_bytes < _MIN_MEMORY_BYTES:
            raise ValueError(f"AppRun.memory_bytes must be >= 6 MB, got {self.memory_bytes}")
        if self.nano_cpus < 0:
            raise ValueError(f"AppRun.nano_cpus must be >= 0, got {self.nano_cpus}")
        if self.output_limit_bytes <= 0:
            raise ValueError("AppRun.output_limit_bytes must be > 0")
        if self.pids_limit <= 0:
            raise ValueError("AppRun.pids_limit must be > 0")
        if self.log_limit_bytes < 1024:
            raise ValueError("AppRun.log_limit_bytes must be >= 1024")
        if self.tmp_bytes < MB:
            raise ValueError("AppRun.tmp_bytes must be >= 1 MB")

    @property
    def container_labels(self) -> dict[str, str]:
        """The labels set on the container: ``run.labels`` plus the task label, which
        :meth:`ContainerRunner.remove_leftovers` and operators rely on, so it always wins."""
        return {**self.labels, TASK_LABEL: self.task_id}


@dataclass
class RunOutcome:
    """What happened to one app run. ``ok`` only when the app exited 0 within every limit.

    ``stdout``/``stderr`` are the (bounded) logs the worker writes to ``stdout.txt`` /
    ``stderr.txt``; ``log_tail`` is the end of both streams, for status reports (in the order
    they were written for a failed run; stdout then stderr otherwise).
    The ``*_limit`` fields only serve :meth:`reason`. ``aborted`` is set when the run was
    stopped through :meth:`ContainerRunner.kill` (task aborted by the scheduler).
    ``error`` is set when the container could not run or its end could not be observed.
    """

    exit_code: int | None
    timed_out: bool = False
    oom_killed: bool = False
    output_too_large: bool = False
    log_tail: str = ""
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0
    error: str | None = None
    # ``error`` is the app's doing (its image names an entrypoint that cannot run), not the
    # engine's
    error_is_the_apps: bool = False
    aborted: bool = False
    time_limit: float | None = None
    memory_limit: int | None = None
    output_limit: int | None = None

    @property
    def ok(self) -> bool:
        return (
            self.exit_code == 0
            and not self.timed_out
            and not self.oom_killed
            and not self.output_too_large
            and not self.aborted
            and self.error is None
        )

    def reason(self) -> str:
        """One human line saying why the run failed (or that it succeeded).

        The order matters: a killed container also has a non-zero exit code (137), and the
        flag that made us kill it is the real reason.
        """
        if self.aborted:
            return "app was stopped on request (task aborted)"
        if self.timed_out:
            limit = f" of {_fmt_seconds(self.time_limit)}" if self.time_limit else ""
            return f"app ran past its time limit{limit} and was stopped"
        if self.output_too_large:
            limit = f" of {_fmt_bytes(self.output_limit)}" if self.output_limit else ""
            return f"app output exceeded the limit{limit} and was stopped"
        if self.oom_killed:
            limit = f" (limit {_fmt_bytes(self.memory_limit)})" if self.memory_limit else ""
            return f"app killed: out of memory{limit}"
        if self.error is not None:
            return f"app container could not run: {self.error}"
        if self.exit_code is None:
            return "app exit code unknown"
        if self.exit_code != 0:
            return f"app exited with code {self.exit_code}"
        return "app exited with code 0"


@runtime_checkable
class ContainerRunner(Protocol):
    """What the worker needs from a container engine (real: :class:`DockerRunner`)."""

    def ensure_image(self, image: str) -> None:
        """Make ``image`` available locally, or raise :class:`AppImageError`."""
        ...

    def run(self, run: AppRun) -> RunOutcome:
        """Run the app to its end (or its limits) and remove its container."""
        ...

    def remove_leftovers(self, label_selector: dict[str, str]) -> int:
        """Remove the containers matching every label (left by a crashed worker)."""
        ...

    def kill(self, name: str) -> bool:
        """Stop the named app container now (task aborted); True if one was found."""
        ...


def dir_size(path: Path) -> int:
    """Total size in bytes of the regular files under ``path``, symlinks not followed.

    The walk goes from directory to directory by file descriptor, so no path length limit
    applies (a tree deeper than PATH_MAX is measured too). The app may be writing while we
    count: files that vanish are skipped; any other error (too many levels, a directory that
    cannot be read) is raised, and callers count it as over the limit, never as zero.
    """

    def fail(exc: OSError) -> None:
        if not isinstance(exc, FileNotFoundError):
            raise exc

    total = 0
    for _, _, files, root_fd in os.fwalk(path, onerror=fail, follow_symlinks=False):
        for name in files:
            try:
                info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode):
                total += info.st_size
    return total


def output_size(run: AppRun) -> tuple[int, bool]:
    """``(bytes used, over the limit)`` of a run's output. On its own filesystem (a tmpfs of
    the limit's size) the filesystem counts, and a full one is over the limit (the app met
    ENOSPC: what it wrote is cut); otherwise the files are added up. Raises when the output
    cannot be measured (callers count that as over the limit)."""
    if run.output_mounted:
        info = os.statvfs(run.output_dir)
        used = (info.f_blocks - info.f_bfree) * info.f_frsize
        full = info.f_bavail * info.f_frsize < 4096 or (info.f_files > 0 and info.f_favail == 0)
        return used, full or used > run.output_limit_bytes
    size = dir_size(run.output_dir)
    return size, size > run.output_limit_bytes


def _is_read_timeout(exc: BaseException) -> bool:
    """True when a requests error is a read timeout, whatever it is wrapped in."""
    import urllib3.exceptions

    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(
            current, (urllib3.exceptions.ReadTimeoutError, requests.exceptions.ReadTimeout)
        ):
            return True
        stack.extend(arg for arg in current.args if isinstance(arg, BaseException))
        stack.append(getattr(current, "reason", None))
        stack.extend((current.__cause__, current.__context__))
    return False


def _tail_text(data: bytes, limit: int) -> str:
    """The last ``limit`` bytes of a log, decoded (a character cut at the start is replaced)."""
    if len(data) > limit:
        data = data[-limit:]
    return data.decode("utf-8", errors="replace")


def cut_notice(limit: int) -> str:
    """The first line of a compute log that was cut, saying the cap."""
    return f"[workerpool: output cut: only its last {limit} bytes are kept]\n"


def capped_log(data: bytes, limit: int) -> str:
    """A stream of the app as the requester gets it (``stdout.txt``, the compute logs): at
    most ``limit`` bytes; when more was written (or the engine gave only its last lines), the
    end of it under a first line that says so."""
    if len(data) <= limit and data.count(b"\n") < _LOG_TAIL_LINES:
        return data.decode("utf-8", errors="replace")
    notice = cut_notice(limit)
    return notice + _tail_text(data, limit - len(notice.encode()))


class _OutputWatch:
    """Measures a running app's output directory every ``interval`` seconds (less often when
    the tree is slow to walk) on its own thread, and kills the container through ``kill``
    once the output passes its limit. The run itself only waits on the engine, so a run
    costs the engine one wait request instead of one per size check."""

    def __init__(self, run: AppRun, interval: float, kill: Callable[[], None]) -> None:
        self.run = run
        self.interval = interval
        self.kill = kill
        self.exceeded = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"out-{run.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> bool:
        """Stop watching; whether the output passed its limit (and the container was killed)."""
        self._stop.set()
        self._thread.join()
        return self.exceeded

    def _watch(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            before = time.monotonic()
            try:
                size, over = output_size(self.run)
            except Exception as exc:  # an output that cannot be measured is not a small one
                log.warning("%s: cannot measure the output: %s", self.run.name, exc)
                size, over = -1, True
            walked = time.monotonic() - before
            if over:
                self.exceeded = True
                log.warning(
                    "%s: output %d bytes, over the limit of %d (or not measurable): killing "
                    "the app container",
                    self.run.name,
                    size,
                    self.run.output_limit_bytes,
                )
                try:
                    self.kill()
                except Exception as exc:  # the run's own wait and checks go on regardless
                    log.warning("%s: kill after output limit failed: %s", self.run.name, exc)
                return
            # a huge tree is slow to walk: walk it less often rather than saturate IO
            wait = max(self.interval, 4 * walked)


class DockerRunner:
    """:class:`ContainerRunner` on a Docker Engine, through the Docker SDK.

    ``client`` defaults to ``docker.from_env()``, created on first use (nothing connects
    at construction). ``poll_interval`` is how often the output size is measured while the
    app runs (the app's end is not polled: the watchdog waits on the engine for it);
    ``max_log_bytes`` bounds the stdout and stderr kept from a run.
    """

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        poll_interval: float = 0.2,
        max_log_bytes: int = DEFAULT_MAX_LOG_BYTES,
    ) -> None:
        self._client = client
        self.poll_interval = poll_interval
        self.max_log_bytes = max_log_bytes
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._abort: set[str] = set()
        self._output_mount_seen = False  # the engine saw a mounted output once

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            import docker

            try:
                self._client = docker.from_env(timeout=60)
            except docker.errors.DockerException as exc:
                raise EngineError(f"cannot connect to the Docker Engine: {exc}") from exc
            if self._client.api.base_url.startswith("http+docker://"):  # a local socket:
                # no proxy applies, so requests need not read the environment at every call
                self._client.api.trust_env = False
        return self._client

    # --- images ---------------------------------------------------------------

    def ensure_image(self, image: str) -> None:
        """Use the local image if present, else pull it once; :class:`AppImageError` if neither.

        A failed pull is not retried here: the error says whose failure it is
        (:attr:`AppImageError.node_fault`), and the scheduler gives a node-side one to another
        worker.
        """
        import docker.errors

        if not image or image != image.strip():
            raise AppImageError(f"invalid app image reference {image!r}")
        try:
            self.client.images.get(image)
            return
        except docker.errors.ImageNotFound:
            pass
        except requests.exceptions.ConnectionError as exc:
            raise EngineError(
                f"Docker Engine unreachable while looking for {image}: {exc}"
            ) from exc
        except docker.errors.APIError as exc:
            explanation = str(exc.explanation or exc)
            raise AppImageError(
                f"app image {image} cannot be inspected: {explanation}",
                node_fault=not image_error_is_the_apps(exc.status_code, explanation),
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise EngineError(f"Docker Engine failed while looking for {image}: {exc}") from exc
        log.info("app image %s is not present locally: pulling it", image)
        try:
            self.client.images.pull(image)
        except requests.exceptions.ConnectionError as exc:
            raise EngineError(f"Docker Engine unreachable while pulling {image}: {exc}") from exc
        except docker.errors.APIError as exc:
            explanation = str(exc.explanation or exc)
            raise AppImageError(
                f"app image {image} is not on this worker and could not be pulled: {explanation}",
                node_fault=not image_error_is_the_apps(exc.status_code, explanation),
            ) from exc
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise AppImageError(
                f"app image {image} is not on this worker and could not be pulled: {exc}",
                node_fault=True,
            ) from exc
        log.info("app image %s pulled", image)

    # --- running --------------------------------------------------------------

    def run(self, run: AppRun) -> RunOutcome:
        """Run ``run`` to its end or its limits; the container is removed in every case.

        Raises :class:`AppImageError` when the image is missing (call :meth:`ensure_image`
        first) and :class:`EngineError` when the engine stops answering. Any other problem
        of the container is reported in :attr:`RunOutcome.error`.
        """
        run.input_dir.mkdir(parents=True, exist_ok=True)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if run.name in self._active:
                raise RunnerError(f"a container named {run.name} is already running here")
            self._active.add(run.name)
            self._abort.discard(run.name)
        import docker.errors

        container: Container | None = None
        try:
            try:
                container = self._create(run)
                if run.output_mounted and not self._output_mount_seen:
                    self._check_output_mount(container, run)
                    # the engine and this process share their mounts: they do for every
                    # later run (one engine request less per task)
                    self._output_mount_seen = True
                return self._start_and_watch(container, run)
            except docker.errors.APIError as exc:  # before RequestException: it is one
                log.warning("%s: Docker Engine error: %s", run.name, exc)
                return RunOutcome(
                    exit_code=None,
                    error=f"Docker Engine error: {exc.explanation or exc}",
                    time_limit=run.timeout,
                    memory_limit=run.memory_bytes,
                    output_limit=run.output_limit_bytes,
                )
            except requests.exceptions.RequestException as exc:
                raise EngineError(f"Docker Engine unreachable during {run.name}: {exc}") from exc
        finally:
            with self._lock:
                self._active.discard(run.name)
                self._abort.discard(run.name)
            self._remove(container, run.name)

    def _create(self, run: AppRun) -> Container:
        """Create the container through the engine API. One request: the SDK's
        ``containers.create`` inspects the new container afterwards, which the run does not
        need (it inspects once, at the end). A name left by a crashed run is removed and the
        creation tried once more."""
        import docker.errors
        from docker.types import LogConfig

        api = self.client.api
        log_config = LogConfig(
            type=LogConfig.types.JSON,
            config={"max-size": str(run.log_limit_bytes), "max-file": "1"},
        )
        host: dict[str, Any] = {
            "binds": {
                str(run.input_dir.resolve()): {
                    "bind": IEXEC_IN,
                    "mode": "rw" if run.input_writable else "ro",
                },
                str(run.output_dir.resolve()): {"bind": IEXEC_OUT, "mode": "rw"},
            },
            "privileged": False,
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "mem_limit": run.memory_bytes,
            "memswap_limit": run.memory_bytes,  # same value: no swap on top of the limit
            "pids_limit": run.pids_limit,
            "log_config": log_config,
            # nothing but /tmp (bounded) and /iexec_out is writable: the container's own layer
            # would otherwise be a disk with no limit
            "read_only": True,
            "tmpfs": {"/tmp": f"size={run.tmp_bytes},mode=1777"},
        }
        if run.nano_cpus:
            host["nano_cpus"] = run.nano_cpus
        if run.network_mode:
            host["network_mode"] = run.network_mode
        elif not run.network:
            host["network_mode"] = "none"

        def create() -> Container:
            answer = api.create_container(
                run.image,
                command=list(run.args) or None,  # None keeps the image CMD
                name=run.name,
                environment=dict(run.env),
                labels=run.container_labels,
                volumes=[IEXEC_IN, IEXEC_OUT],
                host_config=api.create_host_config(**host),
                detach=True,
                tty=False,  # keeps stdout and stderr apart
            )
            return self.client.containers.prepare_model({"Id": answer["Id"], "Name": run.name})

        try:
            return create()
        except docker.errors.ImageNotFound as exc:
            raise AppImageError(f"app image {run.image} is not on this worker") from exc
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                # a container of that name was left by a run that crashed, or lost a race
                # with another creator of the same name: clean and try once more
                log.warning("container name %s taken at create time: removing it", run.name)
                self._remove_stale(run.name)
                return create()
            raise

    @staticmethod
    def _check_output_mount(container: Container, run: AppRun) -> None:
        """Make sure the engine binds the filesystem the worker mounted on ``output_dir``: it
        puts a file into the created container's /iexec_out, which must show up in the
        worker's mount. A worker in a container without shared mount propagation mounts
        where the engine does not look: the app would write past the limit into a folder
        the worker cannot see, so the run is refused as the node's failure."""
        import io
        import tarfile

        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.addfile(tarfile.TarInfo(PROBE_NAME), io.BytesIO(b""))
        container.put_archive(IEXEC_OUT, buffer.getvalue())
        probe = run.output_dir / PROBE_NAME
        seen = os.path.lexists(probe)
        with contextlib.suppress(OSError):
            probe.unlink()
        if not seen:
            raise OutputMountError(
                f"the Docker Engine does not see the filesystem mounted on {run.output_dir} "
                "(the worker runs in another mount namespace than the engine: a worker in a "
                "container needs the work directory bind-mounted with propagation rshared), "
                "so the app's output cannot have a hard limit on this node"
            )

    def _start_and_watch(self, container: Container, run: AppRun) -> RunOutcome:
        import docker.errors

        limits: dict[str, Any] = {
            "time_limit": run.timeout,
            "memory_limit": run.memory_bytes,
            "output_limit": run.output_limit_bytes,
        }
        started = time.monotonic()
        try:
            container.start()
        except docker.errors.APIError as exc:
            # e.g. the entrypoint does not exist in the image: an app problem, not ours
            log.warning("%s: container did not start: %s", run.name, exc)
            explanation = str(exc.explanation or exc)
            return RunOutcome(
                exit_code=None,
                error=f"container did not start: {explanation}",
                error_is_the_apps=any(w in explanation.lower() for w in _APP_START_ERRORS),
                duration=time.monotonic() - started,
                **limits,
            )
        log.info("%s: started %s (task %s)", run.name, run.image, run.task_id)

        timed_out = output_too_large = aborted = False
        error: str | None = None
        killed_at: float | None = None
        exited_with: int | None = None  # the engine's answer to wait, if the app ended
        deadline = started + run.timeout
        watch = _OutputWatch(run, self.poll_interval, lambda: self._kill_container(container))
        watch.start()
        try:
            while True:
                now = time.monotonic()
                if killed_at is None:
                    with self._lock:
                        abort_asked = run.name in self._abort
                    if abort_asked:
                        aborted = True
                    elif now > deadline:
                        timed_out = True
                    if aborted or timed_out:
                        log.warning(
                            "%s: killing the app container (aborted=%s, timed_out=%s)",
                            run.name,
                            aborted,
                            timed_out,
                        )
                        self._kill_container(container)
                        killed_at = time.monotonic()
                        wake = killed_at + _KILL_WAIT_SECONDS
                    else:
                        # just past the deadline, so that the check above sees it passed
                        wake = deadline + 0.01
                elif now - killed_at > _KILL_WAIT_SECONDS:
                    error = f"the container did not stop {_KILL_WAIT_SECONDS:g} s after SIGKILL"
                    break
                else:
                    wake = killed_at + _KILL_WAIT_SECONDS
                # One request that the engine answers when the app exits: the slot is free as
                # soon as it ends. An abort (kill) or the output watch's kill ends it too.
                try:
                    waited = self._wait(container, max(wake - time.monotonic(), _MIN_WAIT_SECONDS))
                except docker.errors.NotFound:
                    error = "the container disappeared while running (removed by someone else?)"
                    break
                if waited is not None:
                    exited_with = waited
                    break
        finally:
            output_too_large = watch.stop()
        duration = time.monotonic() - started
        with self._lock:  # kill() may have stopped it between two checks
            aborted = aborted or run.name in self._abort

        exit_code: int | None = None
        oom_killed = False
        stdout = stderr = log_tail = ""
        try:
            container.reload()
        except docker.errors.NotFound:  # removed by someone else after it ended
            exit_code = exited_with
        else:
            state = container.attrs.get("State", {})
            if state.get("Status") in ("exited", "dead"):
                exit_code = int(state.get("ExitCode", -1))
            oom_killed = bool(state.get("OOMKilled", False))
            failed = exit_code != 0 or oom_killed or error is not None or timed_out or aborted
            stdout, stderr, log_tail = self._logs(container, interleaved=failed)
        if not output_too_large:
            try:
                output_too_large = output_size(run)[1]
            except Exception as exc:  # not measurable: counted as over, never as zero
                log.warning("%s: cannot measure the output: %s", run.name, exc)
                output_too_large = True
        outcome = RunOutcome(
            exit_code=exit_code,
            timed_out=timed_out,
            oom_killed=oom_killed,
            output_too_large=output_too_large,
            log_tail=log_tail,
            stdout=stdout,
            stderr=stderr,
            duration=duration,
            error=error,
            aborted=aborted,
            **limits,
        )
        log.info(
            "%s: finished in %.2f s: %s",
            run.name,
            duration,
            "ok" if outcome.ok else outcome.reason(),
        )
        return outcome

    @staticmethod
    def _wait(container: Container, timeout: float) -> int | None:
        """Block until the container stops or ``timeout`` seconds pass: its exit code, or
        None while it still runs. One request that the engine answers when the app exits,
        instead of inspecting the container every few hundred milliseconds."""
        try:
            answer = container.wait(timeout=timeout)
        except requests.exceptions.ReadTimeout:
            return None
        except requests.exceptions.ConnectionError as exc:
            # over the unix socket, urllib3 reports the read timeout as a connection error
            if _is_read_timeout(exc):
                return None
            raise
        return int(answer.get("StatusCode", -1))

    def _logs(self, container: Container, interleaved: bool) -> tuple[str, str, str]:
        """stdout, stderr and the combined tail, each bounded: logs never blow our memory.
        The tail has both streams in the order they were written only when ``interleaved``
        (a failed run, whose report shows it: one more read); otherwise it is the end of
        stdout then stderr."""
        import docker.errors

        try:
            out = container.logs(stdout=True, stderr=False, tail=_LOG_TAIL_LINES)
            err = container.logs(stdout=False, stderr=True, tail=_LOG_TAIL_LINES)
            if interleaved:
                both = container.logs(stdout=True, stderr=True, tail=200)
            else:
                both = b"\n".join(b"\n".join(x.splitlines()[-100:]) for x in (out, err) if x)
        except docker.errors.APIError as exc:
            log.warning("could not read the logs of %s: %s", container.name, exc)
            return "", "", ""
        limit = self.max_log_bytes
        return capped_log(out, limit), capped_log(err, limit), _tail_text(both, LOG_TAIL_BYTES)

    @staticmethod
    def _kill_container(container: Container) -> None:
        import docker.errors

        try:
            container.kill()
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: it already stopped by itself
                raise

    def _remove_stale(self, name: str) -> None:
        """Remove a container of that name left by a worker that crashed mid-run."""
        import docker.errors

        try:
            stale = self.client.containers.get(name)
        except docker.errors.NotFound:
            return
        log.warning("removing leftover container %s (%s) before reusing its name", name, stale.id)
        with contextlib.suppress(docker.errors.NotFound):
            stale.remove(force=True)

    def _remove(self, container: Container | None, name: str) -> None:
        """Force-remove the run's container; never raises (it runs in a ``finally``).

        With no container object (creation failed or was interrupted) it removes by name,
        since the engine may have created it anyway.
        """
        import docker.errors

        for attempt in range(1, _REMOVE_ATTEMPTS + 1):
            try:
                target = container if container is not None else self.client.containers.get(name)
                target.remove(force=True)
                return
            except docker.errors.NotFound:
                return
            except Exception as exc:
                if attempt == _REMOVE_ATTEMPTS:
                    log.error("could not remove container %s: %s", name, exc)
                    return
                time.sleep(0.2 * attempt)

    # --- maintenance ----------------------------------------------------------

    def remove_leftovers(self, label_selector: dict[str, str]) -> int:
        """Force-remove the containers carrying every ``label=value`` of ``label_selector``.

        Meant for start-up, after a crash. Containers run by this runner right now are
        kept. An empty selector is refused: it would match every container on the host.
        """
        if not label_selector:
            raise ValueError("remove_leftovers needs at least one label (would match everything)")
        import docker.errors

        filters = {"label": [f"{key}={value}" for key, value in label_selector.items()]}
        try:
            found = self.client.containers.list(all=True, filters=filters)
        except requests.exceptions.ConnectionError as exc:
            raise EngineError(f"Docker Engine unreachable: {exc}") from exc
        removed = 0
        for container in found:
            with self._lock:
                if container.name in self._active:
                    continue
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                continue
            log.warning("removed leftover container %s (%s)", container.name, container.labels)
            removed += 1
        return removed

    def label_values(self, label: str, where: dict[str, str] | None = None) -> set[str]:
        """Distinct values of ``label`` among the engine's containers (running or not) that
        also carry every ``label=value`` of ``where``."""
        filters = [label, *(f"{k}={v}" for k, v in (where or {}).items())]
        try:
            found = self.client.containers.list(all=True, filters={"label": filters})
        except requests.exceptions.ConnectionError as exc:
            raise EngineError(f"Docker Engine unreachable: {exc}") from exc
        return {c.labels.get(label, "") for c in found} - {""}

    def kill(self, name: str) -> bool:
        """Stop the named container now. One run by this runner is reported ``aborted`` and
        removed by its :meth:`run`; one owned by nobody here is removed at once."""
        import docker.errors

        try:
            container = self.client.containers.get(name)
        except docker.errors.NotFound:
            return False
        with self._lock:
            owned = name in self._active
            if owned:
                self._abort.add(name)
        if owned:
            self._kill_container(container)
        else:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        return True
