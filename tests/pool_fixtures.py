"""A running pool for end-to-end tests: the scheduler in this process (so tests can read its
mongomock store), its Celery consumer on a thread, a ticking loop, and worker nodes as real
``workerpool worker`` processes that reach it only through Redis and the chain."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from celery.contrib.testing.worker import start_worker
from devnet_fixtures import DevnetHandle

from devnet.network import FIRST_WORKER_INDEX, PUBLIC_TEST_MNEMONIC, WORKER_COUNT
from devnet.requester import MatchedDeal, match_deal
from poco import chain as chain_mod
from poco.types import ChainTaskStatus
from pool import broker, keys
from pool.messages import SCHEDULER_QUEUE, Messenger, make_celery
from pool.settings import Settings
from pool.store import Store
from pool.wallets import chain_client
from scheduler.context import SchedulerContext
from scheduler.service import Scheduler, lock_ttl
from scheduler.tasks import register
from testing.store import memory_store

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunningPool:
    devnet: DevnetHandle
    scheduler: Scheduler
    store: Store
    env: dict[str, str]
    tmp: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    process: SchedulerProcess | None = None

    def restart_scheduler(self, *, crash: bool = True) -> Scheduler:
        """Kill (or stop) the scheduler and start a new one on the same store and Redis."""
        assert self.process is not None
        if crash:
            self.process.crash()
        else:
            self.process.stop()
        self.scheduler = self.process.start()
        return self.scheduler

    def start_worker(
        self, n: int, *, mnemonic: bool = False, host: Any = None, **extra_env: str
    ) -> subprocess.Popen[bytes]:
        """Start worker node ``n`` as a separate process: devnet worker wallet n, or (with
        ``mnemonic``) whatever index it leases from the devnet mnemonic; on ``host`` (a
        worker host of ``ops/hosts``) when given."""
        identity = (
            {
                "IEXEC_WORKER_MNEMONIC": PUBLIC_TEST_MNEMONIC,
                "WORKERPOOL_WORKER_INDEX_FIRST": str(FIRST_WORKER_INDEX),
                "WORKERPOOL_WORKER_INDEX_COUNT": str(WORKER_COUNT),
            }
            if mnemonic
            else {"IEXEC_WORKER_WALLET_PRIVATE_KEY": self.devnet.worker_key(n)}
        )
        env = {
            **self.env,
            **identity,
            "IEXEC_WORKER_NAME": f"test-worker-{n}",
            "IEXEC_WORKER_BASE_DIR": str(self.tmp / f"worker-{n}"),
            **extra_env,
        }
        log = self.tmp / f"worker-{n}.log"
        if log not in self.logs:
            self.logs.append(log)
        command = [sys.executable, "-m", "cli", "worker", "--loglevel", "INFO"]
        proc = subprocess.Popen(
            host.command(command) if host is not None else command,
            env=env,
            cwd=ROOT,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        query = {"name": f"test-worker-{n}"} if mnemonic else {"address": self.worker_address(n)}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.store.workers.find_one({**query, "status": "ALIVE"}):
                return proc
            if proc.poll() is not None:
                raise AssertionError(f"worker {n} exited:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker {n} sent no heartbeat:\n{log.read_text()[-3000:]}")

    def match(self, app: str = "echo", **kw: Any) -> MatchedDeal:
        """A deal of the devnet's requester (or of ``requester_key``) on a sample app."""
        kw.setdefault("requester_key", self.devnet.key("requester"))
        return match_deal(
            self.devnet.client,
            app=self.devnet.app(app),
            app_owner_key=self.devnet.key("app_provider"),
            workerpool=self.devnet.info["workerpool"],
            scheduler_key=self.devnet.key("scheduler"),
            **kw,
        )

    def wait_tasks(
        self,
        taskids: list[str],
        done: Callable[[dict[str, Any]], bool],
        timeout: float = 120,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            docs = [self.store.task(t) or {} for t in taskids]
            if all(done(d) for d in docs):
                return docs
            time.sleep(0.2)
        states = {t: (self.store.task(t) or {}).get("status") for t in taskids}
        reps = {
            t: [
                (r["worker"][:8], [e["status"] for e in r.get("timeline", [])])
                for r in self.store.replicates_of(t)
            ]
            for t in taskids
        }
        timelines = {
            t: [e["status"] for e in (self.store.task(t) or {}).get("timeline", [])]
            for t in taskids
        }
        tails = "\n".join(p.read_text()[-2000:] for p in self.logs)
        raise AssertionError(
            f"tasks not done in {timeout}s: {states}\n{timelines}\n{reps}\n{tails}"
        )

    def chain_status(self, taskid: str) -> ChainTaskStatus:
        return self.devnet.client.view_task(taskid).status

    def worker_address(self, n: int) -> str:
        return str(self.devnet.accounts["workers"][n]["address"]).lower()

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """kill -9 the node (its compute and control processes)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def pool_env(devnet: DevnetHandle, redis_url: str, ipfs_api_url: str) -> dict[str, str]:
    """The environment of the pool's processes (workers inherit it)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("IEXEC_", "WORKERPOOL_"))},
        "IEXEC_PRIVATE_CHAIN_ADDRESS": devnet.info["rpc_url"],
        "IEXEC_HUB_ADDRESS": devnet.info["hub"],
        "POOL_ADDRESS": devnet.info["workerpool"],
        "WORKERPOOL_DEVNET": "1",
        "WORKERPOOL_REDIS_URL": redis_url,
        "IEXEC_IPFS_HOST": ipfs_api_url.split("//")[1].split(":")[0],
        "IEXEC_IPFS_PORT": ipfs_api_url.rsplit(":", 1)[1],
        "WORKERPOOL_RESULT_STORAGE": "ipfs",
        "WORKERPOOL_APP_OUTPUT_LIMIT_MB": "5",
        # the tests serve input files from 127.0.0.1, which workers refuse by default
        "WORKERPOOL_DOWNLOAD_ALLOW_PRIVATE": "1",
        "WORKERPOOL_WORKER_SLOTS": "2",
        "WORKERPOOL_HEARTBEAT_PERIOD": "1",
        "WORKER_LOST_TIMEOUT": "5",
        "PYTHONPATH": str(ROOT),
    }


class Crash(BaseException):
    """Raised at an injected crash point: no ``except Exception`` in the scheduler stops it,
    so the scheduler's thread dies there like a killed process would."""


class SchedulerProcess:
    """The scheduler "process" of a test pool: a Scheduler (its own chain client, wallet and
    nonce counter), its Celery consumer on threads and a ticking thread. :meth:`crash` drops
    all of it the way ``kill -9`` would (nothing finished, the Redis tick lock left held);
    :meth:`start` builds a new one on the same MongoDB, like a restarted container."""

    def __init__(
        self, devnet: DevnetHandle, settings: Settings, store: Store, redis_url: str
    ) -> None:
        self.devnet = devnet
        self.settings = settings
        self.store = store
        self.redis_url = redis_url
        self.scheduler: Scheduler | None = None
        self._stop = threading.Event()
        self._stack: contextlib.ExitStack | None = None
        self._ticker: threading.Thread | None = None
        self.crashed = threading.Event()

    def start(self) -> Scheduler:
        chain_mod.reset_nonces()  # a new process starts with no nonce counter
        client = chain_client(self.settings)
        app = make_celery(self.settings, "workerpool-scheduler")
        ctx = SchedulerContext(
            self.settings,
            self.store,
            client,
            client.wallet(self.devnet.key("scheduler")),
            Messenger(app),
            broker.redis_client(self.settings),
        )
        scheduler = Scheduler(ctx)
        register(app, scheduler)
        self._stop = stop = threading.Event()
        self.crashed = crashed = threading.Event()

        def ticking() -> None:
            while not stop.is_set():
                try:
                    scheduler.tick()
                except Crash:
                    crashed.set()
                    return
                except Exception as exc:  # keep ticking; the test sees the outcome in the store
                    print(f"tick failed: {exc!r}")
                stop.wait(0.3)

        stack = contextlib.ExitStack()
        stack.enter_context(
            start_worker(
                app,
                pool="threads",
                concurrency=4,
                perform_ping_check=False,
                queues=[SCHEDULER_QUEUE],
                shutdown_timeout=20,
            )
        )
        self._stack = stack
        self._ticker = threading.Thread(target=ticking, daemon=True)
        self._ticker.start()
        self.scheduler = scheduler
        return scheduler

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=30)
        if self._stack is not None:
            self._stack.close()
        self._ticker = self._stack = None

    def crash(self) -> None:
        """Stop everything without any clean-up of the scheduler's own: the tick lock of a
        killed process stays in Redis until it expires."""
        lock = broker.redis_client(self.settings)
        self.stop()
        # the dead tick held the lock at the moment of the crash; nobody deletes it
        ttl_ms = int(lock_ttl(self.settings) * 1000)
        lock.set(keys.TICK_LOCK, "killed-scheduler", px=ttl_ms, nx=True)


@contextmanager
def pool_running(
    devnet: DevnetHandle,
    redis_url: str,
    ipfs_api_url: str,
    tmp: Path,
    db: str = "e2e",
    store: Store | None = None,
    **extra_env: str,
) -> Iterator[RunningPool]:
    """Run a pool's scheduler here until the block ends (function or module fixtures).
    ``extra_env`` goes to the scheduler and to every worker (e.g. another chain URL);
    ``store`` is the scheduler's (default: a new in-memory one)."""
    env = {**pool_env(devnet, redis_url, ipfs_api_url), **extra_env}
    settings = Settings.from_env(
        {**env, "IEXEC_START_BLOCK_NUMBER": str(devnet.client.block_number() + 1)}
    )
    store = store or memory_store(db)
    process = SchedulerProcess(devnet, settings, store, redis_url)
    scheduler = process.start()
    pool = RunningPool(devnet, scheduler, store, env, tmp, process=process)
    try:
        yield pool
    finally:
        process.stop()
        pool.stop_workers()
        unmount_below(tmp)


def unmount_below(folder: Path) -> None:
    """Detach the app-output filesystems worker nodes mounted under ``folder`` and left
    mounted (a node killed with -9 in the middle of a run, never restarted)."""
    from workers import mounts

    for line in Path("/proc/mounts").read_text().splitlines():
        target = Path(line.split()[1].replace("\\040", " "))
        if target == folder or folder in target.parents:
            with contextlib.suppress(OSError):
                mounts.unmount(target)


@pytest.fixture
def running_pool(
    devnet: DevnetHandle,
    redis_url: str,
    redis_client: Any,
    ipfs_api_url: str,
    app_images: dict[str, str],
    tmp_path: Path,
) -> Iterator[RunningPool]:
    with pool_running(devnet, redis_url, ipfs_api_url, tmp_path) as pool:
        yield pool
