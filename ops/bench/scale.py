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

from eth_account import Account  # noqa: E402
from web3 import Web3  # noqa: E402

from poco.abi import proxy_abi  # noqa: E402
from poco.chain import Receipt  # noqa: E402
from poco.proofs import result_hash, task_id  # noqa: E402
from poco.types import (  # noqa: E402
    Category,
    ChainTaskStatus,
    Contribution,
    ContributionStatus,
    Deal,
    Resource,
    Task,
)
from pool.celery_app import REPLICATE_TASK, REVEAL_TASK, UPLOAD_TASK  # noqa: E402
from pool.settings import Settings  # noqa: E402

HUB = "0xDc64a140Aa3E981100a9becA4E685f962f0cF6C9"
POOL = "0x" + "11" * 20
APP = "0x" + "22" * 20
REQUESTER = "0x" + "33" * 20
ZERO = "0x" + "00" * 20
ZERO32 = "0x" + "00" * 32
# PUBLIC TEST KEY (anvil's default mnemonic, index 1): signs fake authorizations only
SCHEDULER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---- fakes ------------------------------------------------------------------------------------
class FakeChain:
    """The ChainClient methods the scheduler calls, answered from memory."""

    def __init__(self) -> None:
        self.rpc_url = "fake://chain"
        self.head = 1000
        self.now = int(time.time())
        self.logs: list[dict[str, Any]] = []
        self.deals: dict[str, Deal] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.contributions: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.txs: collections.Counter[str] = collections.Counter()
        self.hub = Web3().eth.contract(address=HUB, abi=proxy_abi(), decode_tuples=True)
        self.category = Category(0, "XS", '""', 300)
        self.rpc_calls = 0

    def _count(self, name: str) -> None:
        self.calls[name] += 1
        self.rpc_calls += 1

    # a deal of `size` tasks matched in a new block
    def add_deal(self, n: int, size: int, trust: int = 1) -> str:
        self.head += 1
        dealid = "0x" + Web3.keccak(text=f"deal-{n}").hex().removeprefix("0x")
        res = Resource(APP, REQUESTER, 0)
        self.deals[dealid] = Deal(
            dealid=dealid,
            app=res,
            dataset=Resource(ZERO, ZERO, 0),
            workerpool=Resource(POOL, REQUESTER, 0),
            trust=trust,
            category=0,
            tag=ZERO32,
            requester=REQUESTER,
            beneficiary=REQUESTER,
            callback=ZERO,
            params="",
            start_time=self.now,
            bot_first=0,
            bot_size=size,
            worker_stake=0,
            scheduler_reward_ratio=1,
            sponsor=REQUESTER,
        )
        self.logs.append(
            {
                "args": {"workerpool": POOL, "dealid": bytes.fromhex(dealid[2:])},
                "blockNumber": self.head,
                "logIndex": 0,
                "transactionHash": bytes.fromhex(dealid[2:]),
            }
        )
        return dealid

    def block_number(self) -> int:
        self._count("eth_blockNumber")
        return self.head

    def block_timestamp(self, block: int | str = "latest", max_age: float = 0.0) -> int:
        # as ChainClient: a read of up to max_age seconds ago may answer
        at = getattr(self, "_read_at", None)
        if max_age > 0 and at is not None and time.monotonic() - at < max_age:
            return self.now
        self._count("eth_getBlockByNumber")
        self._read_at = time.monotonic()
        return self.now

    def get_logs(
        self, event: str, lo: int, hi: int, filters: Any = None, *, chunk: int | None = None
    ) -> Any:
        self._count("eth_getLogs")
        return [e for e in self.logs if lo <= e["blockNumber"] <= hi]

    def view_deal(self, dealid: str) -> Deal:
        self._count("viewDeal")
        return self.deals[dealid]

    def count_category(self) -> int:
        self._count("countCategory")
        return 5

    def view_category(self, category: int) -> Category:
        self._count("viewCategory")
        return self.category

    def view_task(self, taskid: str) -> Task:
        self._count("viewTask")
        t = self.tasks.get(taskid)
        if t is None:
            return _task(taskid, ChainTaskStatus.UNSET, {})
        return _task(taskid, t["status"], t)

    def view_contribution(self, taskid: str, worker: str) -> Contribution:
        self._count("viewContribution")
        c = self.contributions.get((taskid, worker.lower()))
        if c is None:
            return Contribution(ContributionStatus.UNSET, ZERO32, ZERO32, ZERO, 0)
        return Contribution(c["status"], c["hash"], ZERO32, ZERO, 1)

    def domain(self) -> Any:
        raise NotImplementedError("the replenish policy is off in this benchmark")

    # ---- transactions (the scheduler's, through FakeWallet) ----
    def apply(self, name: str, args: tuple[Any, ...]) -> None:
        self.txs[name] += 1
        self.head += 1
        if name == "initializeArray":
            for dealid, idx in zip(args[0], args[1], strict=True):
                self._init("0x" + bytes(dealid).hex(), int(idx))
        elif name == "initialize":
            self._init("0x" + bytes(args[0]).hex(), int(args[1]))
        elif name == "finalize":
            taskid = "0x" + bytes(args[0]).hex()
            t = self.tasks[taskid]
            t["status"] = ChainTaskStatus.COMPLETED
            for w in t["contributors"]:
                self.contributions[(taskid, w.lower())]["status"] = ContributionStatus.PROVED
        elif name in ("claim", "claimArray"):
            ids = args[0] if name == "claimArray" else [args[0]]
            for raw in ids:
                self.tasks["0x" + bytes(raw).hex()]["status"] = ChainTaskStatus.FAILED
        else:
            raise AssertionError(f"unexpected transaction {name}")

    def _init(self, dealid: str, idx: int) -> None:
        taskid = task_id(dealid, idx)
        if taskid in self.tasks:
            raise AssertionError(f"task {taskid} initialized twice")
        deal = self.deals[dealid]
        ref = self.category.work_clock_time_ref
        self.tasks[taskid] = {
            "status": ChainTaskStatus.ACTIVE,
            "dealid": dealid,
            "idx": idx,
            "timeref": ref,
            "contributionDeadline": deal.start_time + 7 * ref,
            "finalDeadline": deal.start_time + 10 * ref,
            "revealDeadline": 0,
            "consensus": ZERO32,
            "revealCounter": 0,
            "winnerCounter": 0,
            "contributors": [],
            "digest": ZERO32,
        }

    # ---- the workers' transactions (FakeWorkers) ----
    def contribute(self, taskid: str, worker: str, digest: str) -> None:
        self.txs["contribute"] += 1
        t = self.tasks[taskid]
        h = result_hash(taskid, digest)
        t["contributors"].append(worker)
        self.contributions[(taskid, worker.lower())] = {
            "status": ContributionStatus.CONTRIBUTED,
            "hash": h,
        }
        t.update(
            status=ChainTaskStatus.REVEALING,
            consensus=h,
            winnerCounter=1,
            revealDeadline=self.now + 2 * 300,
        )

    def reveal(self, taskid: str, worker: str, digest: str) -> None:
        self.txs["reveal"] += 1
        t = self.tasks[taskid]
        t["revealCounter"] += 1
        t["digest"] = digest


def _task(taskid: str, status: ChainTaskStatus, t: dict[str, Any]) -> Task:
    return Task(
        taskid=taskid,
        status=ChainTaskStatus(status),
        dealid=t.get("dealid", ZERO32),
        idx=t.get("idx", 0),
        timeref=t.get("timeref", 0),
        contribution_deadline=t.get("contributionDeadline", 0),
        reveal_deadline=t.get("revealDeadline", 0),
        final_deadline=t.get("finalDeadline", 0),
        consensus_value=t.get("consensus", ZERO32),
        reveal_counter=t.get("revealCounter", 0),
        winner_counter=t.get("winnerCounter", 0),
        contributors=tuple(t.get("contributors", ())),
        result_digest=t.get("digest", ZERO32),
        results=b"",
        results_timestamp=0,
        results_callback=b"",
    )


class FakeWallet:
    """Signs nothing and sends nothing: applies the PoCo call to the fake chain."""

    def __init__(self, chain: FakeChain) -> None:
        self.client = chain
        self.account = Account.from_key(SCHEDULER_KEY)
        self.address = self.account.address

    def transact(self, fn: Any, **_: Any) -> Receipt:
        self.client.apply(fn.fn_name, tuple(fn.args))
        self.client.rpc_calls += 1
        return Receipt(
            tx_hash="0x" + os.urandom(32).hex(),
            block_number=self.client.head,
            gas_used=0,
            status=1,
            logs=[],
        )


class FakeCelery:
    """Captures send_task; the fake workers read the messages back."""

    def __init__(self) -> None:
        self.messages: collections.deque[tuple[str, list[Any], str]] = collections.deque()
        self.sent: collections.Counter[str] = collections.Counter()

    def send_task(
        self, name: str, args: Any = None, kwargs: Any = None, queue: str = "", **_: Any
    ) -> None:
        self.sent[name] += 1
        self.messages.append((name, list(args or []), queue))


class CountingCollection:
    """A pymongo collection that counts the calls the scheduler makes and the documents
    its finds return (on a real MongoDB those are the round trips and the bytes read)."""

    def __init__(self, inner: Any, name: str, ops: collections.Counter[str]) -> None:
        self._inner, self._name, self._ops = inner, name, ops

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._inner, attr)
        if not callable(target):
            return target
        ops, key = self._ops, f"{self._name}.{attr}"

        def call(*a: Any, **kw: Any) -> Any:
            ops[key] += 1
            result = target(*a, **kw)
            if attr == "find":
                return _CountingCursor(result, ops, f"{self._name}.docs_read")
            if attr in ("find_one", "find_one_and_update") and result is not None:
                ops[f"{self._name}.docs_read"] += 1
            return result

        return call


class _CountingCursor:
    def __init__(self, cursor: Any, ops: collections.Counter[str], key: str) -> None:
        self._cursor, self._ops, self._key = cursor, ops, key

    def sort(self, *a: Any, **kw: Any) -> _CountingCursor:
        self._cursor = self._cursor.sort(*a, **kw)
        return self

    def limit(self, n: int) -> _CountingCursor:
        self._cursor = self._cursor.limit(n)
        return self

    def __iter__(self) -> Any:
        for doc in self._cursor:
            self._ops[self._key] += 1
            yield doc


class FakeWorkers:
    """Workers that take every job at once and report like workers/node.py does."""

    def __init__(self, scheduler: Any, chain: FakeChain, celery: FakeCelery, count: int) -> None:
        self.s, self.chain, self.celery = scheduler, chain, celery
        self.addresses = [("0x%040x" % (0xA0000 + i)) for i in range(count)]
        self.next = 0
        self.completed = 0
        self.refused = 0

    def heartbeat(self) -> None:
        for i, w in enumerate(self.addresses):
            self.s.lifecycle.heartbeat(
                w,
                {"name": f"fake-{i}", "capabilities": ["standard"], "slots": 2, "busySlots": 0},
            )

    def step(self, budget: int) -> int:
        """Process up to ``budget`` messages; return how many were processed."""
        done = 0
        lc = self.s.lifecycle
        while done < budget and self.celery.messages:
            name, args, queue = self.celery.messages.popleft()
            done += 1
            taskid = args[0]
            if name == REPLICATE_TASK:
                worker = self.addresses[self.next % len(self.addresses)]
                self.next += 1
                answer = lc.authorize(taskid, worker)
                if not answer.get("granted"):
                    self.refused += 1
                    continue
                digest = "0x" + Web3.keccak(text=taskid).hex().removeprefix("0x")
                for status in ("STARTING", "APP_DOWNLOADING", "COMPUTING"):
                    lc.on_report(taskid, worker, status, {})
                lc.on_report(taskid, worker, "COMPUTED", {"resultDigest": digest, "duration": 0.1})
                lc.on_report(taskid, worker, "CONTRIBUTING", {})
                self.chain.contribute(taskid, worker, digest)
                lc.on_report(taskid, worker, "CONTRIBUTED", {"txHash": "0x" + "ab" * 32})
            elif name == REVEAL_TASK:
                worker = queue.removeprefix("worker.")
                digest = "0x" + Web3.keccak(text=taskid).hex().removeprefix("0x")
                lc.on_report(taskid, worker, "REVEALING", {})
                self.chain.reveal(taskid, worker, digest)
                lc.on_report(taskid, worker, "REVEALED", {"txHash": "0x" + "cd" * 32})
            elif name == UPLOAD_TASK:
                worker = queue.removeprefix("worker.")
                lc.on_report(taskid, worker, "RESULT_UPLOADING", {})
                link = f'{{ "storage": "local", "location": "/results/{taskid}.zip" }}'
                lc.on_report(taskid, worker, "RESULT_UPLOADED", {"resultLink": link})
                if self.chain.tasks[taskid]["status"] == ChainTaskStatus.COMPLETED:
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
    from scheduler.service import Scheduler

    experiments.apply()  # WORKERPOOL_BENCH_TRY, if any

    base_rss = current_rss_mb()
    ops: collections.Counter[str] = collections.Counter()
    store = Store(mongomock.MongoClient()["bench"])
    for name in ("deals", "tasks", "replicates", "workers", "cursors"):
        setattr(store, name, CountingCollection(getattr(store, name), name, ops))
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
    scheduler = Scheduler(settings, store, chain, FakeWallet(chain), celery)  # type: ignore[arg-type]
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
    while celery.sent[REPLICATE_TASK] < n:
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
            "jobs_sent": celery.sent[REPLICATE_TASK],
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
