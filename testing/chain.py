"""A chain in memory: the :class:`~poco.chain.ChainClient` reads the scheduler makes, answered
from dicts and counted by JSON-RPC method, and a wallet whose transactions change that state
(initialize, finalize, claim) instead of being sent. The workers' transactions are played by
:meth:`FakeChain.contribute` and :meth:`FakeChain.reveal`.

Tasks and contributions are the protocol's own types (:class:`~poco.types.Task`,
:class:`~poco.types.Contribution`): a test may put any state in :attr:`FakeChain.tasks` and
:attr:`FakeChain.contributions` directly, built with :func:`chain_task` and
:func:`contribution`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from eth_account import Account
from web3 import Web3

from poco.abi import proxy_abi
from poco.chain import Receipt
from poco.errors import FilterRefused
from poco.proofs import result_hash, task_id
from poco.types import (
    Category,
    ChainTaskStatus,
    Contribution,
    ContributionStatus,
    Deal,
    Resource,
    Task,
)

HUB = "0xDc64a140Aa3E981100a9becA4E685f962f0cF6C9"
POOL = "0x" + "11" * 20
APP = "0x" + "22" * 20
REQUESTER = "0x" + "33" * 20
ZERO = "0x" + "00" * 20
ZERO32 = "0x" + "00" * 32
# PUBLIC TEST KEY (anvil's default mnemonic, index 1): signs fake authorizations only
SCHEDULER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"


def chain_task(
    taskid: str,
    status: ChainTaskStatus,
    contributors: list[str] | tuple[str, ...] = (),
    **fields: Any,
) -> Task:
    """A task as viewTask answers it; ``fields`` are :class:`~poco.types.Task` fields."""
    base: dict[str, Any] = {
        "dealid": ZERO32,
        "idx": 0,
        "timeref": 0,
        "contribution_deadline": 0,
        "reveal_deadline": 0,
        "final_deadline": 0,
        "consensus_value": ZERO32,
        "reveal_counter": 0,
        "winner_counter": 0,
        "result_digest": ZERO32,
        "results": b"",
        "results_timestamp": 0,
        "results_callback": b"",
    }
    return Task(
        taskid=taskid,
        status=ChainTaskStatus(status),
        contributors=tuple(contributors),
        **{**base, **fields},
    )


def contribution(
    status: ContributionStatus, result_hash: str = ZERO32, weight: int = 1
) -> Contribution:
    """A contribution as viewContribution answers it."""
    return Contribution(
        status=status,
        result_hash=result_hash,
        result_seal=ZERO32,
        enclave_challenge=ZERO,
        weight=weight,
    )


def fake_block_hash(block: int) -> str:
    """The hash of block ``block`` on the fake chain (which never reorganises)."""
    return "0x" + Web3.keccak(text=f"block-{block}").hex().removeprefix("0x")


class _Tasks(dict[str, Task]):
    """The chain's tasks by id. A task initialized and not changed since is kept as its deal
    and index, and made when read (a fake chain of 100,000 tasks in flight stays small: the
    task id as a number, its deal's number and its index packed in another)."""

    def __init__(self, make: Callable[[str, str, int], Task]) -> None:
        super().__init__()
        self.initialized: dict[int, int] = {}  # task id -> deal number << 32 | index
        self._deals: list[str] = []
        self._deal_numbers: dict[str, int] = {}
        self._make = make

    def initialize(self, taskid: str, dealid: str, idx: int) -> None:
        if not 0 <= idx < 2**32:
            raise AssertionError(f"task index {idx} out of this fake's range")
        number = self._deal_numbers.get(dealid)
        if number is None:
            number = self._deal_numbers[dealid] = len(self._deals)
            self._deals.append(dealid)
        self.initialized[_number(taskid)] = number << 32 | idx

    def __missing__(self, taskid: str) -> Task:
        packed = self.initialized.get(_number(taskid))
        if packed is not None:
            return self._make(taskid, self._deals[packed >> 32], packed & 0xFFFFFFFF)
        raise KeyError(taskid)

    def get(self, taskid: str, default: Any = None) -> Any:
        try:
            return self[taskid]
        except KeyError:
            return default

    def __contains__(self, taskid: object) -> bool:
        return dict.__contains__(self, taskid) or (
            isinstance(taskid, str) and _number(taskid) in self.initialized
        )


def _number(taskid: str) -> int:
    """A task id's number (-1, which no task has, for what is not a 0x-prefixed bytes32)."""
    digits = taskid[2:]
    if len(taskid) != 66 or not taskid.startswith("0x") or not digits.isalnum():
        return -1
    try:
        return int(digits, 16)
    except ValueError:
        return -1


class FakeChain:
    """The ChainClient methods the scheduler calls, answered from memory; :attr:`calls`
    counts them by JSON-RPC method (``eth_blockNumber``, ``viewTask`` ...)."""

    def __init__(self, *, now: int | None = None, head: int = 1000, hub: str = HUB) -> None:
        self.rpc_url = "fake://chain"
        self.chain_id = 31337  # a devnet's: no confirmations by default
        self.hub_address = hub
        self.head = head
        self.now = int(time.time()) if now is None else now
        self.logs: list[dict[str, Any]] = []
        self.deals: dict[str, Deal] = {}
        self.tasks = _Tasks(self._initialized_task)
        self.contributions: dict[tuple[str, str], Contribution] = {}
        self.calls: collections.Counter[str] = collections.Counter()
        self.txs: collections.Counter[str] = collections.Counter()
        self.hub = Web3().eth.contract(
            address=Web3.to_checksum_address(hub), abi=proxy_abi(), decode_tuples=True
        )
        self.category = Category(0, "XS", '""', 300)
        self.rpc_calls = 0
        self._time_read_at: float | None = None
        # block filters (eth_newBlockFilter): id -> the head at the last look; ``filters``
        # False: the node refuses them
        self.filters = True
        self._filters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] += 1
        self.rpc_calls += 1

    # ---- what the tests set up -----------------------------------------------------------
    def add_deal(self, n: int, size: int, trust: int = 1) -> str:
        """A deal of ``size`` tasks matched in a new block (its SchedulerNotice logged)."""
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
                "blockHash": bytes.fromhex(fake_block_hash(self.head)[2:]),
                "logIndex": 0,
                "transactionHash": bytes.fromhex(dealid[2:]),
            }
        )
        return dealid

    # ---- reads ---------------------------------------------------------------------------
    def block_number(self) -> int:
        self._count("eth_blockNumber")
        return self.head

    def block_timestamp(self, block: int | str = "latest", max_age: float = 0.0) -> int:
        # as ChainClient: a read of up to max_age seconds ago may answer
        at = self._time_read_at
        if max_age > 0 and at is not None and time.monotonic() - at < max_age:
            return self.now
        self._count("eth_getBlockByNumber")
        self._time_read_at = time.monotonic()
        return self.now

    def new_block_filter(self) -> str:
        self._count("eth_newBlockFilter")
        if not self.filters:
            raise FilterRefused("the method eth_newBlockFilter does not exist/is not available")
        filter_id = hex(len(self._filters) + 1)
        self._filters[filter_id] = self.head
        return filter_id

    def block_filter_changes(self, filter_id: str) -> list[str]:
        self._count("eth_getFilterChanges")
        if filter_id not in self._filters:
            raise FilterRefused(f"filter {filter_id} not found")
        seen, self._filters[filter_id] = self._filters[filter_id], self.head
        return [fake_block_hash(b) for b in range(seen + 1, self.head + 1)]

    def uninstall_filter(self, filter_id: str) -> None:
        self._count("eth_uninstallFilter")
        self._filters.pop(filter_id, None)

    def forget_filters(self) -> None:
        """The node forgets its filters (it restarted, or they expired)."""
        self._filters.clear()

    def get_logs(
        self, event: str, lo: int, hi: int, filters: Any = None, *, chunk: int | None = None
    ) -> Any:
        self._count("eth_getLogs")
        return [e for e in self.logs if lo <= e["blockNumber"] <= hi]

    def block_hash(self, block: int) -> str | None:
        self._count("eth_getBlockByNumber")
        return fake_block_hash(block) if block <= self.head else None

    def view_deal(self, dealid: str, *, fresh: bool = False) -> Deal:
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
        return self.tasks.get(taskid) or chain_task(taskid, ChainTaskStatus.UNSET)

    def view_contribution(self, taskid: str, worker: str) -> Contribution:
        self._count("viewContribution")
        found = self.contributions.get((taskid, worker.lower()))
        return found or contribution(ContributionStatus.UNSET, weight=0)

    def domain(self) -> Any:
        raise NotImplementedError("orders are not signed on the fake chain")

    def callback_gas(self) -> int:
        """PoCo's callbackgas (the devnet's value)."""
        self._count("callbackgas")
        return 100_000

    # ---- the scheduler's transactions (through FakeWallet) -------------------------------
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
            task = self.tasks[taskid]
            self.tasks[taskid] = dataclasses.replace(
                task,
                status=ChainTaskStatus.COMPLETED,
                results=bytes(args[1]),
                results_callback=bytes(args[2]),
            )
            for worker in task.contributors:
                key = (taskid, worker.lower())
                self.contributions[key] = dataclasses.replace(
                    self.contributions[key], status=ContributionStatus.PROVED
                )
        elif name in ("claim", "claimArray"):
            for raw in args[0] if name == "claimArray" else [args[0]]:
                taskid = "0x" + bytes(raw).hex()
                self.tasks[taskid] = dataclasses.replace(
                    self.tasks[taskid], status=ChainTaskStatus.FAILED
                )
        else:
            raise AssertionError(f"unexpected transaction {name}")

    def _init(self, dealid: str, idx: int) -> None:
        taskid = task_id(dealid, idx)
        if taskid in self.tasks:
            raise AssertionError(f"task {taskid} initialized twice")
        self.tasks.initialize(taskid, dealid, idx)

    def _initialized_task(self, taskid: str, dealid: str, idx: int) -> Task:
        deal = self.deals[dealid]
        ref = self.category.work_clock_time_ref
        return chain_task(
            taskid,
            ChainTaskStatus.ACTIVE,
            dealid=dealid,
            idx=idx,
            timeref=ref,
            contribution_deadline=deal.start_time + 7 * ref,
            final_deadline=deal.start_time + 10 * ref,
        )

    # ---- the workers' transactions -------------------------------------------------------
    def contribute(self, taskid: str, worker: str, digest: str) -> None:
        """``worker`` contributes ``digest``: trust 1, so consensus at once."""
        self.txs["contribute"] += 1
        task = self.tasks[taskid]
        sealed = result_hash(taskid, digest)
        self.contributions[(taskid, worker.lower())] = contribution(
            ContributionStatus.CONTRIBUTED, sealed
        )
        self.tasks[taskid] = dataclasses.replace(
            task,
            status=ChainTaskStatus.REVEALING,
            contributors=(*task.contributors, worker),
            consensus_value=sealed,
            winner_counter=1,
            reveal_deadline=self.now + 2 * 300,
        )

    def reveal(self, taskid: str, worker: str, digest: str) -> None:
        self.txs["reveal"] += 1
        task = self.tasks[taskid]
        self.tasks[taskid] = dataclasses.replace(
            task, reveal_counter=task.reveal_counter + 1, result_digest=digest
        )
        key = (taskid, worker.lower())
        self.contributions[key] = dataclasses.replace(
            self.contributions[key], status=ContributionStatus.PROVED
        )


class FakeWallet:
    """Signs nothing and sends nothing: applies the PoCo call to the fake chain. Its key is a
    public test key (authorizations are really signed with it)."""

    def __init__(self, chain: FakeChain, key: str = SCHEDULER_KEY) -> None:
        self.client = chain
        self.account = Account.from_key(key)
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
