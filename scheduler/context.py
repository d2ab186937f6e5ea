"""What every part of the scheduler works with, built once per process (:func:`scheduler.
service.build`) and shared: settings, store, chain client, the scheduler's wallet, the
messages to the workers, and Redis (None in tests that run without it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from poco.chain import ChainClient, Wallet
from pool.messages import Domain, Messenger, Nonces, Refusals
from pool.settings import Settings
from pool.states import ReplicateStatus, TaskStatus
from pool.store import Store
from scheduler.tee import TeeTasks

R = ReplicateStatus
T = TaskStatus

# task statuses in which contributions are still being collected
CONTRIBUTING = (T.INITIALIZED, T.RUNNING, T.REOPENED)
# task statuses between consensus and finalize: winners may still have to reveal
REVEAL_PHASE = (T.CONSENSUS_REACHED, T.AT_LEAST_ONE_REVEALED, T.RESULT_UPLOADING, T.RESULT_UPLOADED)
# replicates under way (their worker may still contribute)
IN_FLIGHT = frozenset(
    str(s)
    for s in (R.CREATED, R.STARTING, R.APP_DOWNLOADING, R.COMPUTING, R.COMPUTED, R.CONTRIBUTING)
)

# replicate statuses that will never contribute
REPLICATE_DEAD = frozenset(
    str(s)
    for s in (
        R.START_FAILED,
        R.APP_DOWNLOAD_FAILED,
        R.DATA_DOWNLOAD_FAILED,
        R.COMPUTE_FAILED,
        R.CONTRIBUTE_FAILED,
        R.WORKER_LOST,
        R.ABORTED,
    )
)


@dataclass(frozen=True)
class SchedulerContext:
    settings: Settings
    store: Store
    client: ChainClient
    wallet: Wallet
    messages: Messenger
    redis: Any = None

    def __post_init__(self) -> None:
        self.settings.require("pool_address")

    @property
    def pool(self) -> str:
        """The workerpool this scheduler serves (POOL_ADDRESS)."""
        return str(self.settings.pool_address)

    @cached_property
    def domain(self) -> Domain:
        """The EIP-712 domain workers sign their messages in (this chain, this pool)."""
        return Domain(self.client.chain_id, self.pool)

    @cached_property
    def refusals(self) -> Refusals:
        """Refused worker messages: logged, counted in Redis for /metrics."""
        return Refusals(self.redis)

    @cached_property
    def nonces(self) -> Nonces:
        """The nonces of the worker messages taken (replays are refused)."""
        return Nonces(self.redis)

    @cached_property
    def tee(self) -> TeeTasks:
        """The SMS calls of TEE tasks (framework, enclave challenges), one per process."""
        return TeeTasks(self.settings, self.wallet)

    @property
    def confirmations(self) -> int:
        """Blocks the listener waits: WORKERPOOL_CONFIRMATIONS, or the chain's default."""
        return self.settings.confirmations_for(self.client.chain_id)


@dataclass
class TickReport:
    """What one tick (or fast listen) did, for its log line and the tests."""

    deals_new: int = 0
    deals_skipped: int = 0
    tasks_initialized: int = 0
    init_transactions: int = 0
    tasks_init_failed: int = 0
    jobs_enqueued: int = 0
    tasks_claimed: int = 0
    head: int | None = None
    skipped_tick: bool = False
    errors: list[str] = field(default_factory=list)
