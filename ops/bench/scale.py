"""Measurement 3: the scheduler at scale, with the chain, Celery and the workers as fast fakes.

One size per process (``python ops/bench/scale.py --tasks 10000``) so that peak RSS is that
size's own; prints one JSON object. Two phases on one store:

* **dispatch**: N tasks in deals of ``--deal-size`` are on the fake chain; the real
  :class:`scheduler.service.Scheduler` ticks until every task is RUNNING with its replicate
  job sent (listen, store, initializeArray in batches, plan, enqueue). Then ``--idle-ticks``
  more ticks with the N tasks running and no worker taking them: the cost of one tick at N.
* **lifecycle** (``--lifecycle``): fake workers take every job and walk it through the
  scheduler's real code (authorize, the 10 status reports of a replicate, consensus, reveal,
  upload, finalize) to COMPLETED, ticking every ``--poll-period`` seconds of wall time as the
  beat would.

The chain fake answers from dicts and applies the scheduler's transactions to its own state;
the wallet fake still builds each PoCo call through web3 (the encoding cost is real) and the
authorizations are really signed. The store is mongomock with hash indexes
(``indexed_mongomock``), or plain mongomock with ``--plain-mongomock``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from web3 import Web3  # noqa: E402

from poco.types import ChainTaskStatus  # noqa: E402
from pool.messages import REVEAL, RUN_REPLICATE, UPLOAD, Messenger  # noqa: E402
from pool.settings import Settings  # noqa: E402
from testing.celery import FakeCelery  # noqa: E402
from testing.chain import HUB, POOL, FakeChain, FakeWallet  # noqa: E402
from testing.store import count_calls  # noqa: E402
from testing.workers import SigningWorker  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- fake workers ----------------------------------------------------------------------------
class FakeWorkers:
    """Workers that take every job at once and report like workers/node.py does: each
    message signed with the worker's key and handed to the scheduler's inbox, which checks
    it as it checks a real node's."""

    def __init__(self, scheduler: Any, chain: FakeChain, celery: FakeCelery, count: int) -> None:
        self.s, self.chain, self.celery = scheduler, chain, celery
        domain = scheduler.ctx.domain
        self.workers = {}
        for i in range(count):
            key = bytes(Web3.keccak(text=f"bench-worker-{i}"))
            worker = SigningWorker(key, domain, f"fake-{i}")
            self.workers[worker.address.lower()] = worker
        self.addresses = list(self.workers)
        self.next = 0
        self.completed = 0
        self.refused = 0

    def heartbeat(self) -> None:
        for worker in self.workers.values():
            self.s.inbox.heartbeat(worker.heartbeat())

    def report(self, taskid: str, worker: str, status: str, **fields: Any) -> None:
        self.s.inbox.report(self.workers[worker].report(taskid, status, **fields))

    def step(self, budget: int) -> int:
        """Process up to ``budget`` messages; return how many were processed."""
        done = 0
        while done < budget and self.celery.messages:
            name, args, queue = self.celery.messages.popleft()
            done += 1
            taskid = args[0]["taskid"]
            if name == RUN_REPLICATE.name:
                worker = self.addresses[self.next % len(self.addresses)]
                self.next += 1
                answer = self.s.inbox.authorize(self.workers[worker].authorize(taskid))
                if not answer.granted:
                    self.refused += 1
                    continue
                digest = "0x" + Web3.keccak(text=taskid).hex().removeprefix("0x")
                for status in ("STARTING", "APP_DOWNLOADING", "COMPUTING"):
                    self.report(taskid, worker, status)
                self.report(taskid, worker, "COMPUTED", duration=0.1)
                self.report(taskid, worker, "CONTRIBUTING")
                self.chain.contribute(taskid, worker, digest)
                self.report(taskid, worker, "CONTRIBUTED", tx_hash="0x" + "ab" * 32)
            elif name == REVEAL.name:
                worker = queue.removeprefix("worker.")
                digest = "0x" + Web3.keccak(text=taskid).hex().removeprefix("0x")
                self.report(taskid, worker, "REVEALING")
                self.chain.reveal(taskid, worker, digest)
                self.report(taskid, worker, "REVEALED", tx_hash="0x" + "cd" * 32)
            elif name == UPLOAD.name:
                worker = queue.removeprefix("worker.")
                self.report(taskid, worker, "RESULT_UPLOADING")
                link = f'{{ "storage": "local", "location": "/results/{taskid}.zip" }}'
                self.report(taskid, worker, "RESULT_UPLOADED", result_link=link)
                if self.chain.tasks[taskid].status == ChainTaskStatus.COMPLETED:
                    self.completed += 1
        return done


# ---- the run --------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run(args: argparse.Namespace) -> dict[str, Any]:
    import mongomock_ng as mongomock

    if not args.plain_mongomock:
        import indexed_mongomock

        indexed_mongomock.install()
    import experiments

    from pool.store import Store
    from scheduler.context import SchedulerContext
    from scheduler.service import Scheduler

    experiments.apply()  # WORKERPOOL_BENCH_TRY, if any

    base_rss = current_rss_mb()
    store = Store(mongomock.MongoClient()["bench"])
    ops = count_calls(store)
    store.ensure_indexes()
    chain = FakeChain()
    celery = FakeCelery()
    settings = Settings(
        chain_rpc_url="fake://chain",
        hub_address=HUB,
        pool_address=POOL,
        start_block=chain.head + 1,
        poll_period=args.poll_period,
        init_batch_size=args.init_batch_size,
    )
    ctx = SchedulerContext(settings, store, chain, FakeWallet(chain), Messenger(celery))  # type: ignore[arg-type]
    scheduler = Scheduler(ctx)
    n, size = args.tasks, args.deal_size
    made = 0
    while made < n:
        chain.add_deal(made, min(size, n - made))
        made += min(size, n - made)

    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001)
        profiler.start()

    # ---- phase A: dispatch every task ----
    ticks = 0
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    tick_times: list[float] = []
    while celery.sent[RUN_REPLICATE.name] < n:
        report, wall, _ = _timed(scheduler.tick)
        tick_times.append(wall)
        ticks += 1
        if report.errors:
            raise SystemExit(f"tick errors: {report.errors}")
        if ticks > 50:
            raise SystemExit(f"not dispatched after 50 ticks: {celery.sent}")
    dispatch_wall, dispatch_cpu = time.perf_counter() - w0, time.process_time() - c0
    dispatch_ops = dict(ops)
    dispatch_calls = dict(chain.calls)
    dispatch_tx = dict(chain.txs)
    rss_after_dispatch = rss_mb()

    # ---- one tick with N tasks running and nobody taking them ----
    idle: list[float] = []
    idle_ops0 = sum(ops.values())
    for _ in range(args.idle_ticks):
        _, wall, _ = _timed(scheduler.tick)
        idle.append(wall)
    idle_ops = (sum(ops.values()) - idle_ops0) / max(1, args.idle_ticks)

    result: dict[str, Any] = {
        "tasks": n,
        "deal_size": size,
        "store": "mongomock" if args.plain_mongomock else "mongomock+hash-indexes",
        "dispatch": {
            "ticks": ticks,
            "wall_s": round(dispatch_wall, 3),
            "cpu_s": round(dispatch_cpu, 3),
            "tasks_per_s": round(n / dispatch_wall, 1),
            "us_per_task": round(dispatch_wall / n * 1e6, 1),
            "store_ops_per_task": round(
                sum(v for k, v in dispatch_ops.items() if not k.endswith("docs_read")) / n, 2
            ),
            "store_ops": dispatch_ops,
            "chain_calls": dispatch_calls,
            "transactions": dispatch_tx,
            "init_tx_per_task": round(dispatch_tx.get("initializeArray", 0) / n, 4),
            "jobs_sent": celery.sent[RUN_REPLICATE.name],
        },
        "idle_tick": {
            "ticks": args.idle_ticks,
            "median_s": round(sorted(idle)[len(idle) // 2], 4) if idle else None,
            "store_ops": round(idle_ops, 1),
        },
        "rss_mb": {
            "start": round(base_rss, 1),
            "after_dispatch_peak": round(rss_after_dispatch, 1),
        },
    }

    # ---- phase B: the whole lifecycle with fake workers ----
    if args.lifecycle:
        workers = FakeWorkers(scheduler, chain, celery, args.workers)
        workers.heartbeat()
        ops0 = collections.Counter(ops)
        calls0 = collections.Counter(chain.calls)
        tx0 = collections.Counter(chain.txs)
        w0, c0 = time.perf_counter(), time.process_time()
        last_tick = time.perf_counter()
        lc_ticks = 0
        deadline = time.monotonic() + args.lifecycle_timeout
        while workers.completed < n:
            workers.step(200)
            if time.perf_counter() - last_tick >= args.poll_period or not celery.messages:
                workers.heartbeat()
                scheduler.tick()
                lc_ticks += 1
                last_tick = time.perf_counter()
            if time.monotonic() > deadline:
                raise SystemExit(
                    f"lifecycle: {workers.completed}/{n} completed in {args.lifecycle_timeout}s"
                )
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        d_ops = ops - ops0
        d_calls = chain.calls - calls0
        d_tx = chain.txs - tx0
        result["lifecycle"] = {
            "workers": args.workers,
            "ticks": lc_ticks,
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "tasks_per_s": round(n / wall, 1),
            "us_per_task": round(wall / n * 1e6, 1),
            "store_ops_per_task": round(
                sum(v for k, v in d_ops.items() if not k.endswith("docs_read")) / n, 2
            ),
            "docs_read_per_task": round(
                sum(v for k, v in d_ops.items() if k.endswith("docs_read")) / n, 2
            ),
            "chain_reads_per_task": round(sum(d_calls.values()) / n, 2),
            "chain_calls": dict(d_calls),
            "transactions": dict(d_tx),
            "messages": dict(celery.sent),
            "refused": workers.refused,
        }
        result["rss_mb"]["after_lifecycle_peak"] = round(rss_mb(), 1)
    result["rss_mb"]["peak"] = round(rss_mb(), 1)
    if profiler is not None:
        profiler.stop()
        out = Path(args.profile)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        result["profile"] = str(out)
    return result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--deal-size", type=int, default=100)
    p.add_argument("--init-batch-size", type=int, default=20)
    p.add_argument("--idle-ticks", type=int, default=3)
    p.add_argument("--lifecycle", action="store_true")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--poll-period", type=float, default=2.0)
    p.add_argument("--lifecycle-timeout", type=float, default=1800)
    p.add_argument("--plain-mongomock", action="store_true")
    p.add_argument("--profile", default="", help="write a pyinstrument text profile here")
    return p.parse_args(argv)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(run(parse())))
