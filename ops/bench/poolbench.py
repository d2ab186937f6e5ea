"""Measurements 1, 2 and 4 on the devnet: a real pool beside bare ``docker run``.

The pool is run the way ``tests/pool_fixtures.py`` runs it: the scheduler in this process (its
Celery consumer on threads, a tick loop every ``poll_period`` like ``workerpool standalone``)
so that its store can be read; worker nodes are real ``workerpool worker`` processes that
reach it only through Redis and the chain. Every service talks to anvil directly; the chain
usage is counted by the services' own clients (``ChainClient.usage()``: requests by JSON-RPC
method, transactions by PoCo function), the workers' written to files by ``usage.py``, so
the requester and the benchmark's own polling are not charged to the pool.

The store is mongomock with indexes (``testing/indexed_mongomock.py``: a stand-in for an
indexed MongoDB); ``--store plain`` uses plain mongomock, as ``workerpool standalone`` does.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
APP = "echo"
APP_ARGS = "hello bench"

# task timeline -> stage names for the per-task breakdown (measurement 1)
STAGES = [
    ("listen", "t0", "task:RECEIVED"),
    ("initialize", "task:RECEIVED", "task:INITIALIZED"),
    ("plan+enqueue", "task:INITIALIZED", "task:RUNNING"),
    ("queue+authorize", "task:RUNNING", "rep:CREATED"),
    ("prepare (image, inputs)", "rep:CREATED", "rep:COMPUTING"),
    ("app container", "rep:COMPUTING", "rep:COMPUTED"),
    ("contribute tx", "rep:COMPUTED", "rep:CONTRIBUTED"),
    ("consensus + reveal tx", "rep:CONTRIBUTED", "rep:REVEALED"),
    ("upload", "rep:REVEALED", "rep:RESULT_UPLOADED"),
    ("finalize tx", "rep:RESULT_UPLOADED", "task:COMPLETED"),
    ("seen on chain", "task:COMPLETED", "t1"),
]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# ---- CPU accounting ---------------------------------------------------------------------------
class CpuMeter:
    """CPU seconds of named process groups between start() and stop(), and of everything else
    on the machine (``other``: other users of this machine, e.g. a test run).

    A group counts its processes with their descendants, except the groups named in
    ``alone``: the benchmark driver (where the scheduler runs) is the parent of the workers,
    anvil, which have groups of their own."""

    def __init__(self, groups: dict[str, list[int]], alone: frozenset[str] = frozenset()) -> None:
        self.groups = groups
        self.alone = alone
        self.before: dict[str, float] = {}
        self.t0 = 0.0
        self.sys0: Any = None

    @staticmethod
    def _tree_cpu(pid: int, alone: bool = False) -> float:
        try:
            p = psutil.Process(pid)
            if alone:
                t = p.cpu_times()
                return float(t.user + t.system)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0.0
        for q in procs:
            with contextlib.suppress(psutil.Error):
                t = q.cpu_times()
                total += (
                    t.user
                    + t.system
                    + getattr(t, "children_user", 0)
                    + getattr(t, "children_system", 0)
                )
        return total

    @staticmethod
    def _engine_cpu() -> float:
        total = 0.0
        for p in psutil.process_iter(["name"]):
            if p.info["name"] in ("dockerd", "containerd", "containerd-shim-runc-v2", "runc"):
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
        return total

    def _sample(self) -> dict[str, float]:
        out = {
            name: sum(self._tree_cpu(p, name in self.alone) for p in pids)
            for name, pids in self.groups.items()
        }
        out["docker engine"] = self._engine_cpu()
        return out

    def start(self) -> None:
        self.before = self._sample()
        self.t0 = time.monotonic()
        self.sys0 = psutil.cpu_times()

    def stop(self) -> dict[str, Any]:
        after = self._sample()
        wall = time.monotonic() - self.t0
        sys1 = psutil.cpu_times()
        busy = (sys1.user + sys1.system + sys1.nice + sys1.irq + sys1.softirq) - (
            self.sys0.user + self.sys0.system + self.sys0.nice + self.sys0.irq + self.sys0.softirq
        )
        used = {k: round(after[k] - self.before.get(k, 0.0), 3) for k in after}
        ours = sum(used.values())
        cores = psutil.cpu_count() or 1
        return {
            "wall_s": round(wall, 3),
            "cpu_s": used,
            "machine_busy_pct": round(100 * busy / (wall * cores), 1),
            "machine_cpu_s": round(busy, 3),
            "other_cpu_pct": round(max(0.0, busy - ours) * 100 / (wall * cores), 1),
        }


# ---- bare Docker ------------------------------------------------------------------------------
def docker_run_argv(image: str, workdir: Path, i: int) -> list[str]:
    d = workdir / f"bare-{i}"
    (d / "in").mkdir(parents=True, exist_ok=True)
    (d / "out").mkdir(parents=True, exist_ok=True)
    return [
        "docker", "run", "--rm", "--network", "none",
        "-v", f"{d / 'in'}:/iexec_in:ro", "-v", f"{d / 'out'}:/iexec_out",
        "-e", "IEXEC_OUT=/iexec_out", "-e", "IEXEC_IN=/iexec_in",
        image, *APP_ARGS.split(),
    ]  # fmt: skip


def bare_run(image: str, workdir: Path, i: int) -> float:
    argv = docker_run_argv(image, workdir, i)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, timeout=120)
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"docker run failed: {proc.stderr.decode()[-500:]}")
    shutil.rmtree(workdir / f"bare-{i}", ignore_errors=True)
    return elapsed


def bare_sequential(image: str, workdir: Path, runs: int) -> dict[str, Any]:
    bare_run(image, workdir, 0)  # warm-up: page cache, image layers
    times = [bare_run(image, workdir, i) for i in range(runs)]
    return {
        "runs": runs,
        "median_s": round(median(times), 3),
        "all_s": [round(t, 3) for t in times],
    }


def bare_mean(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """One baseline from the bare runs before and after the pool's: the mean of each rate
    and CPU figure, both runs kept."""
    keys = ("tasks_per_s", "machine_cpu_ms_per_run", "machine_busy_pct", "engine_cpu_ms_per_run")
    mean = {k: round((before[k] + after[k]) / 2, 3) for k in keys if k in before and k in after}
    return {**before, **mean, "before": before, "after": after}


def bare_concurrent(image: str, workdir: Path, runs: int, concurrency: int) -> dict[str, Any]:
    meter = CpuMeter({})
    meter.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda i: bare_run(image, workdir, i), range(runs)))
    wall = time.monotonic() - t0
    cpu = meter.stop()
    return {
        "runs": runs,
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "tasks_per_s": round(runs / wall, 3),
        # everything the machine did per run: CLI, engine, shim, the app (and other users)
        "machine_cpu_ms_per_run": round(cpu["machine_cpu_s"] / runs * 1000, 1),
        "machine_busy_pct": cpu["machine_busy_pct"],
        "engine_cpu_ms_per_run": round(cpu["cpu_s"]["docker engine"] / runs * 1000, 1),
    }


# ---- the pool ---------------------------------------------------------------------------------
@dataclass
class Pool:
    devnet_dir: Path
    redis_url: str
    workdir: Path
    chain_port: int
    poll_period: float
    store_kind: str = "indexed"
    worker_slots: int = 2
    listen_period: float = 0.5
    extra_env: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    scheduler_client: Any = None  # the scheduler's own client: its usage is the scheduler's
    _baseline: dict[str, Any] = field(default_factory=dict)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    scheduler: Any = None
    store: Any = None
    client: Any = None  # direct to anvil, for the benchmark's own reads (not counted)
    _stop: threading.Event = field(default_factory=threading.Event)
    _ctx: Any = None
    _ticker: threading.Thread | None = None
    tick_errors: list[str] = field(default_factory=list)
    # across hosts (ops/hosts): worker n runs on worker host n and reaches Redis, the chain
    # and the results through its link; None: every process on this host's loopback
    net: Any = None
    _worker_reach: dict[str, str] = field(default_factory=dict)

    # -- devnet, chain usage
    def start_chain(self) -> None:
        from devnet import network as devnet
        from poco.chain import ChainClient, reset_nonces

        shutil.rmtree(self.devnet_dir, ignore_errors=True)  # a fresh chain every run
        reset_nonces()  # (this process may have run a pool on an earlier chain)
        self.info, _, _ = devnet.up(self.devnet_dir, port=self.chain_port)
        self.client = ChainClient(self.info["rpc_url"], self.info["hub"])
        shutil.rmtree(self.usage_dir, ignore_errors=True)
        if self.net is not None:
            # the core's Redis (a password required), the chain published on its address
            self.redis_url = self.net.start_redis().url()
            chain = self.net.publish(int(self.info["rpc_url"].rsplit(":", 1)[1]))
            self._worker_reach = {
                "IEXEC_PRIVATE_CHAIN_ADDRESS": f"http://{self.net.core_ip}:{chain}",
                "WORKERPOOL_REDIS_URL": self.redis_url,
            }

    @property
    def usage_dir(self) -> Path:
        return self.workdir / "usage"

    def _usage(self) -> dict[str, dict[str, dict[str, int]]]:
        import usage

        roles = {"scheduler": self.scheduler_client.usage() if self.scheduler_client else {}}
        for n in range(len(self.workers)):
            roles[f"worker{n}"] = usage.read(self.usage_dir, f"worker{n}-")
        return {
            "calls": {r: dict(u.get("calls", {})) for r, u in roles.items()},
            "transactions": {r: dict(u.get("transactions", {})) for r, u in roles.items()},
        }

    def stats(self) -> dict[str, Any]:
        """Chain usage per role since :meth:`reset_stats` (after the workers' next dump)."""
        import usage

        time.sleep(3 * usage.DUMP_PERIOD)
        now, base = self._usage(), self._baseline
        out: dict[str, Any] = {}
        for kind, roles in now.items():
            out[kind] = {
                role: {
                    k: v - base.get(kind, {}).get(role, {}).get(k, 0)
                    for k, v in counts.items()
                    if v - base.get(kind, {}).get(role, {}).get(k, 0)
                }
                for role, counts in roles.items()
            }
        return out

    def reset_stats(self) -> None:
        import usage

        time.sleep(3 * usage.DUMP_PERIOD)
        self._baseline = self._usage()

    # -- scheduler
    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("IEXEC_", "WORKERPOOL_"))}
        return {
            **keep,
            "IEXEC_HUB_ADDRESS": self.info["hub"],
            "POOL_ADDRESS": self.info["workerpool"],
            "WORKERPOOL_DEVNET": "1",
            "WORKERPOOL_REDIS_URL": self.redis_url,
            "WORKERPOOL_RESULT_STORAGE": "local",
            "WORKERPOOL_LOCAL_RESULTS_DIR": str(self.workdir / "results"),
            "WORKERPOOL_WORKER_SLOTS": str(self.worker_slots),
            "WORKERPOOL_POLL_PERIOD": str(self.poll_period),
            "WORKERPOOL_LISTEN_PERIOD": str(self.listen_period),
            "PYTHONPATH": os.pathsep.join(
                dict.fromkeys(  # patches/: sitecustomize counts the chain usage (usage.py)
                    [
                        *os.environ.get("WORKERPOOL_BENCH_PYTHONPATH", "").split(os.pathsep),
                        str(HERE / "patches"),
                        str(ROOT),
                    ]
                )
            ).strip(os.pathsep),
            "WORKERPOOL_BENCH_TRY": os.environ.get("WORKERPOOL_BENCH_TRY", ""),
            **self.extra_env,
        }

    def start_scheduler(self) -> None:
        import mongomock_ng as mongomock
        import redis
        from celery.contrib.testing.worker import start_worker

        from poco.chain import ChainClient
        from pool.messages import SCHEDULER_QUEUE, Messenger, make_celery
        from pool.settings import Settings
        from pool.store import Store
        from scheduler.context import SchedulerContext
        from scheduler.service import Scheduler
        from scheduler.tasks import register

        if self.store_kind == "indexed":
            from testing import indexed_mongomock

            indexed_mongomock.install()
        redis.Redis.from_url(self.redis_url).flushdb()  # this benchmark's own database
        env = {**self.env(), "IEXEC_PRIVATE_CHAIN_ADDRESS": self.info["rpc_url"]}
        settings = Settings.from_env(
            {**env, "IEXEC_START_BLOCK_NUMBER": str(self.client.block_number() + 1)}
        )
        self.store = Store(mongomock.MongoClient()["bench"])  # (a new one per pool)
        self.store.ensure_indexes()
        client = ChainClient(self.info["rpc_url"], self.info["hub"], log_chunk=settings.log_range)
        self.scheduler_client = client
        app = make_celery(settings, "workerpool-scheduler")
        ctx = SchedulerContext(
            settings,
            self.store,
            client,
            client.wallet(self.info["accounts"]["scheduler"]["private_key"]),
            Messenger(app),
            redis.Redis.from_url(self.redis_url),
        )
        self.scheduler = Scheduler(ctx)
        register(app, self.scheduler)
        self._ctx = start_worker(
            app,
            pool="threads",
            concurrency=4,
            perform_ping_check=False,
            queues=[SCHEDULER_QUEUE],
            shutdown_timeout=20,
            loglevel="WARNING",
        )
        self._ctx.__enter__()

        def on_report(report: Any) -> None:
            if report.errors:
                self.tick_errors.extend(report.errors)

        def ticking() -> None:  # as cli/standalone.py does: full tick and fast listen
            loop = getattr(self.scheduler, "loop", None)
            if loop is not None:
                loop(self._stop, on_report)
                return
            while not self._stop.is_set():  # (a scheduler without the fast listen)
                try:
                    on_report(self.scheduler.tick())
                except Exception as exc:
                    self.tick_errors.append(repr(exc))
                self._stop.wait(self.poll_period)

        self._ticker = threading.Thread(target=ticking, daemon=True, name="tick")
        self._ticker.start()

    def start_workers(self, count: int) -> None:
        for n in range(count):
            worker = self.info["accounts"]["workers"][n]
            env = {
                **self.env(),
                "IEXEC_PRIVATE_CHAIN_ADDRESS": self.info["rpc_url"],
                "WORKERPOOL_BENCH_USAGE_FILE": str(self.usage_dir / f"worker{n}-{{pid}}.json"),
                "IEXEC_WORKER_WALLET_PRIVATE_KEY": worker["private_key"],
                "IEXEC_WORKER_NAME": f"bench-worker-{n}",
                "IEXEC_WORKER_BASE_DIR": str(self.workdir / f"worker-{n}"),
                **self._worker_reach,
            }
            log = open(self.workdir / f"worker-{n}.log", "wb")  # noqa: SIM115
            command = [sys.executable, "-m", "cli", "worker", "--loglevel", "WARNING"]
            if self.net is not None:
                command = self.net.workers[n % len(self.net.workers)].command(command)
            self.workers.append(
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + 90
        for n in range(count):
            address = self.info["accounts"]["workers"][n]["address"].lower()
            while not self.store.workers.find_one({"address": address, "status": "ALIVE"}):
                if self.workers[n].poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / f"worker-{n}.log").read_text()[-3000:]
                    raise RuntimeError(f"worker {n} did not come up:\n{tail}")
                time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=30)
        for proc in self.workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._ctx.__exit__(None, None, None)
        from devnet import network as devnet

        devnet.Devnet(self.devnet_dir).stop()  # (also one whose start failed half-way)

    # -- deals
    def match(self, volume: int) -> Any:
        from devnet.requester import deal_params, match_deal
        from poco.chain import ChainClient

        requester = ChainClient(self.info["rpc_url"], self.info["hub"])
        accounts = self.info["accounts"]
        return match_deal(
            requester,
            app=self.info["apps"][APP]["address"],
            app_owner_key=accounts["app_provider"]["private_key"],
            workerpool=self.info["workerpool"],
            scheduler_key=accounts["scheduler"]["private_key"],
            requester_key=accounts["requester"]["private_key"],
            volume=volume,
            trust=1,
            params=deal_params(APP_ARGS),
        )

    def cpu_groups(self) -> dict[str, list[int]]:
        from devnet import network as devnet

        anvil = devnet.Devnet(self.devnet_dir).pid()
        return {
            # this process alone: the scheduler's threads and the driver's polling
            "scheduler (+bench driver)": [os.getpid()],
            "workers": [p.pid for p in self.workers],
            "anvil": [anvil] if anvil else [],
        }


def _ts(value: Any) -> float:
    """A store timestamp (naive UTC) as epoch seconds."""
    return float(value.replace(tzinfo=dt.UTC).timestamp())


def _events(pool: Pool, taskid: str) -> dict[str, float]:
    out: dict[str, float] = {}
    task = pool.store.task(taskid) or {}
    for e in task.get("timeline", []):
        out.setdefault(f"task:{e['status']}", _ts(e["at"]))
    for rep in pool.store.replicates_of(taskid):
        for e in rep.get("timeline", []):
            out.setdefault(f"rep:{e['status']}", _ts(e["at"]))
        if rep.get("duration") is not None:
            out["container_s"] = float(rep["duration"])
    return out


def _wait_chain_completed(pool: Pool, taskid: str, timeout: float) -> float:
    from poco.types import ChainTaskStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pool.client.view_task(taskid).status == ChainTaskStatus.COMPLETED:
            return time.time()
        time.sleep(0.02)
    raise RuntimeError(f"task {taskid} not COMPLETED on chain after {timeout}s: {_diag(pool)}")


def _wait_settled(pool: Pool, taskids: list[str], timeout: float = 30) -> None:
    """Until the store shows the tasks COMPLETED (the scheduler's last writes are done)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((pool.store.task(t) or {}).get("status") == "COMPLETED" for t in taskids):
            return
        time.sleep(0.05)


def _diag(pool: Pool) -> str:
    counts: dict[str, int] = {}
    for t in pool.store.tasks.find({}, {"status": 1}):
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    tails = "\n".join(
        (pool.workdir / f"worker-{n}.log").read_text()[-1500:] for n in range(len(pool.workers))
    )
    return f"store: {counts}; tick errors: {pool.tick_errors[-5:]}\n{tails}"


def measure_overhead(pool: Pool, runs: int, bare: dict[str, Any]) -> dict[str, Any]:
    """Measurement 1: one trust-1 task, matchOrders mined -> COMPLETED on chain."""
    pool.match(1)  # warm-up: first deal, imports, connections, image inspection
    warm = pool.stats  # noqa: F841
    latencies: list[float] = []
    stages: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    containers: list[float] = []
    rpc_per_task: list[dict[str, Any]] = []
    # let the warm-up deal finish
    time.sleep(0.5)
    deadline = time.monotonic() + 60
    while pool.store.tasks.count_documents({"status": {"$ne": "COMPLETED"}}) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    rng = random.Random(7)
    for _ in range(runs):
        # a deal lands anywhere in the tick period: spread the runs over it
        time.sleep(0.3 + rng.uniform(0, pool.poll_period))
        pool.reset_stats()
        deal = pool.match(1)
        t0 = time.time()
        (taskid,) = deal.taskids()
        t1 = _wait_chain_completed(pool, taskid, 120)
        latencies.append(t1 - t0)
        _wait_settled(pool, [taskid])
        time.sleep(0.2)
        rpc_per_task.append(pool.stats())
        ev = {**_events(pool, taskid), "t0": t0, "t1": t1}
        for name, a, b in STAGES:
            if a in ev and b in ev:
                stages[name].append(ev[b] - ev[a])
        if "container_s" in ev:
            containers.append(ev["container_s"])
    pool_median = median(latencies)
    return {
        "runs": runs,
        "pool_median_s": round(pool_median, 3),
        "pool_all_s": [round(x, 3) for x in latencies],
        "bare_docker_median_s": bare["median_s"],
        "overhead_s": round(pool_median - bare["median_s"], 3),
        "container_in_runner_median_s": round(median(containers), 3),
        "stages_median_s": {k: round(median(v), 3) for k, v in stages.items() if v},
        "chain_single_task": _per_role(rpc_per_task[-1], 1) if rpc_per_task else {},
    }


def _per_role(stats: dict[str, Any], tasks: int) -> dict[str, Any]:
    out: dict[str, Any] = {"calls_per_task": {}, "tx_per_task": {}, "tx_by_function": {}}
    for role, calls in stats.get("calls", {}).items():
        if role == "requester":
            continue
        key = "workers" if role.startswith("worker") else role
        out["calls_per_task"][key] = out["calls_per_task"].get(key, 0) + sum(calls.values())
    for role, txs in stats.get("transactions", {}).items():
        if role == "requester":
            continue
        key = "workers" if role.startswith("worker") else role
        out["tx_per_task"][key] = out["tx_per_task"].get(key, 0) + sum(txs.values())
        for fn, n in txs.items():
            out["tx_by_function"][fn] = out["tx_by_function"].get(fn, 0) + n
    by_method: dict[str, int] = {}
    for role, calls in stats.get("calls", {}).items():
        if role == "requester":
            continue
        for m, n in calls.items():
            by_method[m] = by_method.get(m, 0) + n
    out["calls_by_method"] = {
        m: round(n / tasks, 2) for m, n in sorted(by_method.items(), key=lambda x: -x[1])
    }
    for k in ("calls_per_task", "tx_per_task"):
        out[k] = {r: round(n / tasks, 2) for r, n in out[k].items()}
    out["tx_by_function"] = {f: round(n / tasks, 3) for f, n in out["tx_by_function"].items()}
    init = out["tx_by_function"].get("initializeArray", 0) + out["tx_by_function"].get(
        "initialize", 0
    )
    out["init_tx_per_task"] = round(init, 4)
    out["rpc_calls_per_task"] = round(sum(out["calls_per_task"].values()), 2)
    return out


def start_py_spy(pool: Pool, out_dir: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy (sampling, no change to the code) on the scheduler and on worker 0 (both of its
    processes); collapsed stacks in ``out_dir``/pyspy-*.txt."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return []
    targets = {"scheduler": (os.getpid(), [])}
    if pool.workers:
        targets["worker0"] = (pool.workers[0].pid, ["--subprocesses"])
    procs = []
    for name, (pid, extra) in targets.items():
        procs.append(
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    *extra,
                    "--rate",
                    "100",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--gil",
                    "-o",
                    str(out_dir / f"pyspy-{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(1.0)
    return procs


def stop_py_spy(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure_throughput(
    pool: Pool, volume: int, bare: dict[str, Any], timeout: float, profile_dir: Path | None = None
) -> dict[str, Any]:
    """Measurements 2 and 4: a deal of ``volume`` tasks on the workers, its chain usage counted
    by the services' own clients."""
    spies = start_py_spy(pool, profile_dir) if profile_dir else []
    meter = CpuMeter(pool.cpu_groups(), alone=frozenset({"scheduler (+bench driver)"}))
    pool.reset_stats()
    meter.start()
    load_before = load1()
    deal = pool.match(volume)
    t0 = time.time()
    taskids = deal.taskids()
    deadline = time.monotonic() + timeout
    stuck = ""
    while True:
        done = pool.store.tasks.count_documents({"chainDealId": deal.dealid, "status": "COMPLETED"})
        if done >= volume:
            break
        if time.monotonic() > deadline:
            if done < volume * 0.9:
                raise RuntimeError(f"{done}/{volume} COMPLETED after {timeout}s: {_diag(pool)}")
            stuck = f"{volume - done} task(s) not COMPLETED after {timeout}s: {_diag(pool)}"
            break
        time.sleep(0.25)
    cpu = meter.stop()
    stop_py_spy(spies)
    stats = pool.stats()
    ends = sorted(e for t in taskids if (e := _events(pool, t).get("task:COMPLETED")))
    volume = len(ends)
    wall = ends[-1] - t0
    lo, hi = ends[len(ends) // 10], ends[(len(ends) * 9) // 10]
    steady = (len(ends) * 8 // 10) / (hi - lo) if hi > lo else float("nan")
    from poco.types import ChainTaskStatus

    on_chain = sum(pool.client.view_task(t).status == ChainTaskStatus.COMPLETED for t in taskids)
    rate = volume / wall
    per_task_cpu = {k: round(v / volume * 1000, 1) for k, v in cpu["cpu_s"].items()}
    return {
        "tasks": volume,
        "completed_on_chain": on_chain,
        "stuck": stuck[:3000],
        "workers": len(pool.workers),
        "slots_per_worker": pool.worker_slots,
        "wall_s": round(wall, 3),
        "pool_tasks_per_s": round(rate, 3),
        "pool_steady_tasks_per_s": round(steady, 3),
        "bare_docker": bare,
        "ratio_vs_bare": round(rate / bare["tasks_per_s"], 3),
        "cpu_ms_per_task": per_task_cpu,
        "machine_cpu_ms_per_task": round(cpu["machine_cpu_s"] / volume * 1000, 1),
        "machine": {**cpu, "load1_before": load_before, "load1_after": load1()},
        "chain": _per_role(stats, volume),
    }


@contextlib.contextmanager
def running_pool(
    devnet_dir: Path,
    redis_url: str,
    workdir: Path,
    chain_port: int,
    poll_period: float,
    workers: int,
    store_kind: str,
    slots: int,
    listen_period: float = 0.5,
    link: Any = False,
) -> Iterator[Pool]:
    """A pool on this host (``link`` False), or with each worker on a worker host of its own
    (``ops/hosts``) whose link has the ``link`` shape (a :class:`hosts.Shape`; None: a plain
    veth link)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pool = Pool(
        devnet_dir, redis_url, workdir, chain_port, poll_period, store_kind, slots,
        listen_period=listen_period,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        if link is not False:
            if str(ROOT / "ops") not in sys.path:
                sys.path.insert(0, str(ROOT / "ops"))
            import hosts

            pool.net = stack.enter_context(
                hosts.Hosts(workers, shape=link, workdir=workdir / "hosts")
            )
        try:
            pool.start_chain()
            pool.start_scheduler()
            pool.start_workers(workers)
            yield pool
        finally:
            pool.stop()
