"""What every part of the scheduler works with, built once per process (:func:`scheduler.
service.build`) and shared: settings, store, chain client, the scheduler's wallet, the
messages to the workers, and Redis (None in tests that run without it)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from poco.chain import ChainClient, Wallet
from poco.proofs import sign_abort
from pool.clock import utcnow
from pool.messages import AbortRequest, Domain, Messenger, Nonces, Refusals
from pool.settings import Settings
from pool.states import ERROR_RESULT_STATUSES, ReplicateStatus, ReplicateStatusCause, TaskStatus
from pool.store import Store
from scheduler.tee import TeeTasks

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

# task statuses in which contributions are still being collected
CONTRIBUTING = (T.INITIALIZED, T.RUNNING, T.REOPENED)
# task statuses between consensus and finalize: winners may still have to reveal
REVEAL_PHASE = (T.CONSENSUS_REACHED, T.AT_LEAST_ONE_REVEALED, T.RESULT_UPLOADING, T.RESULT_UPLOADED)
# replicates under way (their worker may still contribute): a failure of the app or of the
# requester's inputs (APP_DOWNLOAD_FAILED, DATA_DOWNLOAD_FAILED, COMPUTE_FAILED) is followed by
# the contribution of an error result
IN_FLIGHT = frozenset(
    str(s)
    for s in (
        R.CREATED,
        R.STARTING,
        R.APP_DOWNLOADING,
        R.COMPUTING,
        R.COMPUTED,
        R.CONTRIBUTING,
        *ERROR_RESULT_STATUSES,
    )
)

# steps that send a transaction and record its outcome: a task left in one of these by a
# scheduler that died is looked at once no live scheduler can still wait for it
INTERRUPTIBLE = (T.FINALIZING, T.FINALIZED, T.REOPENING)
INTERRUPTED_MARGIN = 10.0  # seconds beyond WORKERPOOL_TX_TIMEOUT

# replicates a node may still be working on, though the scheduler no longer counts on them
STILL_RUNNING = IN_FLIGHT | {str(R.WORKER_LOST)}

# replicate statuses that will never contribute
REPLICATE_DEAD = frozenset(
    str(s) for s in (R.START_FAILED, R.CONTRIBUTE_FAILED, R.WORKER_LOST, R.ABORTED)
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

    def abort_replicates(
        self,
        taskid: str,
        statuses: Iterable[str],
        cause: ReplicateStatusCause,
        reason: str,
    ) -> list[str]:
        """Record ``taskid``'s replicates in ``statuses`` ABORTED for ``cause``, and tell
        each of their nodes (``workers.abort`` on the node's own queue) to stop its container
        and delete its files. Returns the workers told."""
        workers = self.store.abort_replicates(taskid, statuses, reason, cause=str(cause))
        for worker in workers:
            self.send_abort(worker, taskid, cause, reason)
        return workers

    def send_abort(
        self, worker: str, taskid: str, cause: ReplicateStatusCause, reason: str
    ) -> None:
        """Tell ``worker``'s node to abort its replicate of ``taskid``, signed with the
        scheduler's key (the node obeys the pool owner only). Redis down: logged, the node's
        janitor deletes the task's files once the task is final."""
        signature = sign_abort(self.wallet.account.key, worker, taskid, str(cause), reason)
        try:
            self.messages.abort(worker, AbortRequest(taskid, cause, reason, signature))
        except Exception as exc:
            log.warning("task %s: could not tell %s to abort: %s", taskid, worker, exc)

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

    def interrupted_after(self, since: dt.datetime | None = None) -> dt.datetime:
        """When a step claimed at ``since`` (now) counts as interrupted if its task is still
        there: ``WORKERPOOL_TX_TIMEOUT`` + 10 s later, no live scheduler waits for its
        transaction any more (the time the claim marks its task for the tick's look)."""
        seconds = self.settings.tx_timeout + INTERRUPTED_MARGIN
        return (since or utcnow()) + dt.timedelta(seconds=seconds)

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
