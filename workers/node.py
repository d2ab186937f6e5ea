"""A worker node: take a replicate job, get the scheduler's authorization, run the app,
contribute; later reveal and upload when the scheduler asks.

The node reads everything it needs about a task from the chain (the job message carries only
the task id and its deadline) and reports each status change to the scheduler as a message
(``scheduler.replicate_update``); it never touches MongoDB, so nodes need only Redis and the
chain to join a pool. What it must remember between contribute and reveal/upload (the result
digest and the zipped output) stays in its work directory, keyed by task id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Unpack

from poco import actions
from poco.chain import ChainClient, Wallet
from poco.errors import PocoError, RetryableError, TransactionReverted
from poco.funds import GasCheck, format_rlc, gas_check
from poco.orders import ZERO_ADDRESS
from poco.results import result_link
from poco.tags import is_tee, tag_to_int
from poco.types import ChainTaskStatus, ContributionStatus, Deal
from pool import keys
from pool.messages import (
    AnswerLost,
    AuthorizeRequest,
    Heartbeat,
    Messenger,
    ReplicateReport,
    ReportFields,
)
from pool.redact import redact_urls
from pool.settings import Settings
from pool.states import ReplicateStatus
from pool.states import ReplicateStatusCause as Cause
from workers import inputs as inputs_mod
from workers import results as results_mod
from workers import tee as tee_mod
from workers.identity import IndexLease, LeaseLost, liveness_ttl
from workers.publishers import PublishError, ResultPublisher
from workers.runner import AppImageError, AppRun, ContainerRunner, EngineError, RunnerError

log = logging.getLogger(__name__)

R = ReplicateStatus
VERSION = "0.1.0"
WORKER_LABEL = "workerpool.worker"
BROKER_LABEL = "workerpool.broker"
MB = 1024 * 1024
# a resumed replicate is computed again only with this many category time references left
# before the contribution deadline (the scheduler's own rule for a new authorization)
RECOMPUTE_TIME_RATIO = 1.0
_CONTRIBUTED = (ContributionStatus.CONTRIBUTED, ContributionStatus.PROVED)
# the node's gas balance is read at most this often for the check before each job
FUNDS_TTL = 5.0
# a refusal stays in the heartbeat (the scheduler and the API show it) this long
REFUSAL_SHOWN = 60.0


class JobRefused(Exception):
    """The scheduler refused the authorization; ``requeue`` says whether to put the job back."""

    def __init__(self, reason: str, requeue: bool) -> None:
        super().__init__(reason)
        self.requeue = requeue


@dataclass
class JobOutcome:
    taskid: str
    status: str  # the last replicate status reached, or DROPPED
    reason: str = ""


class WorkerNode:
    def __init__(
        self,
        settings: Settings,
        client: ChainClient,
        wallet: Wallet,
        messages: Messenger,
        runner: ContainerRunner,
        publisher: ResultPublisher,
        *,
        redis: Any = None,
        lease: IndexLease | None = None,
        workdir: Path | None = None,
        tee: tee_mod.TdxRunner | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.wallet = wallet
        self.address = wallet.address
        self.messages = messages
        self.redis = redis  # liveness keys (None: the scheduler reads heartbeat messages only)
        self.lease = lease  # the mnemonic index this node holds, renewed with each heartbeat
        self.runner = runner
        self.publisher = publisher
        self.tee = tee  # TDX tasks (workers/tee.py); None: this node refuses TEE tasks
        self.name = settings.worker_name or socket.gethostname()
        base = workdir or Path(settings.worker_dir or tempfile.mkdtemp(prefix="workerpool-worker-"))
        self.workdir = base / self.address.lower()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # what a previous life left, listed before this one takes any job: resume() runs on a
        # thread beside the first jobs, whose directories it must not take for leftovers
        self.leftovers = sorted(p.parent.name for p in self.workdir.glob("0x*/state.json"))
        self.busy = 0
        self.broker_id = hashlib.sha256(settings.redis_url.encode()).hexdigest()[:16]
        self._busy_lock = threading.Lock()
        self.authorization_timeout = 30.0
        self._gas: tuple[float, GasCheck] | None = None
        self._refusal: tuple[float, str] | None = None  # (monotonic time, reason)

    # ---- messages to the scheduler ----------------------------------------------------------
    def report(self, taskid: str, status: ReplicateStatus, **fields: Unpack[ReportFields]) -> None:
        """Tell the scheduler this node's replicate of ``taskid`` is now ``status``
        (``fields``: what :class:`~pool.messages.ReplicateReport` carries beside it)."""
        self.messages.report(ReplicateReport(taskid, self.address, status, **fields))

    def heartbeat(self) -> dict[str, Any]:
        """Send a signed heartbeat; returns its envelope."""
        return self.messages.heartbeat(self.info())

    def info(self) -> Heartbeat:
        refusal = self._refusal
        refusing = refusal[1] if refusal and time.monotonic() - refusal[0] < REFUSAL_SHOWN else None
        return Heartbeat(
            worker=self.address,
            name=self.name,
            capabilities=self.settings.node_capabilities(),
            slots=self.settings.worker_slots,
            busy_slots=self.busy,
            version=VERSION,
            cpus=os.cpu_count(),
            memory_mb=_memory_mb(),
            refusing=refusing,
        )

    def authorize(self, taskid: str) -> tuple[str, bool, str]:
        """The scheduler's signed authorization for this node on ``taskid``, whether it asks
        for the one-transaction path (``contributeAndFinalize``, trust-1 tasks), and the
        enclave it signed in (a TEE task's challenge, else the zero address)."""
        answer = self.messages.authorize(
            AuthorizeRequest(taskid, self.address, ZERO_ADDRESS), self.authorization_timeout
        )
        if not answer.granted:
            raise JobRefused(answer.reason or "refused", answer.requeue)
        return answer.signature, answer.fast_path, answer.enclave or ZERO_ADDRESS

    # ---- funds: gas and stake ----------------------------------------------------------------
    def gas(self, max_age: float = FUNDS_TTL) -> GasCheck:
        """The node's gas balance against one transaction's cost (iexec-worker's
        ``hasEnoughGas``), read at most every ``max_age`` seconds."""
        cached = self._gas
        if cached is not None and time.monotonic() - cached[0] < max_age:
            return cached[1]
        budget = int(self.settings.gas_price_budget_gwei * 10**9)
        check = gas_check(self.client, self.address, budget)
        self._gas = (time.monotonic(), check)
        if check.empty:
            log.error("%s", check.describe(self.address))
        elif check.low:
            log.warning("%s", check.describe(self.address))
        return check

    def expects_fast_path(self, deal: Deal) -> bool:
        """Whether this node's replicate of ``deal`` should go through contributeAndFinalize,
        which locks no worker stake (PoCo: trust-1 deals only; the scheduler grants it unless
        WORKERPOOL_CONTRIBUTE_AND_FINALIZE=false, which pools set alike on every service)."""
        return deal.trust == 1 and (self.settings.contribute_and_finalize or is_tee(deal.tag))

    def stake_shortfall(self, deal: Deal) -> str:
        """Why this node's free stake cannot cover the worker stake ``contribute`` locks for
        ``deal`` ("" when it can)."""
        if deal.worker_stake <= 0:
            return ""
        stake = self.client.view_account(self.address).stake
        if stake >= deal.worker_stake:
            return ""
        return (
            f"stake too low: {self.address} has {format_rlc(stake)} RLC of free stake, a "
            f"contribution to deal {deal.dealid} locks {format_rlc(deal.worker_stake)} RLC; "
            "deposit more (workerpool account deposit)"
        )

    def cannot_take(self, deal: Deal) -> str:
        """Why this node must not take a job of ``deal`` now ("" when it may), checked before
        it asks for an authorization, as iexec-worker does before asking for a replicate: gas
        for at least one transaction, and the free stake a contribution locks (none for
        contributeAndFinalize)."""
        gas = self.gas()
        if gas.empty:
            return gas.describe(self.address)
        if self.expects_fast_path(deal):
            return ""
        return self.stake_shortfall(deal)

    def refuse(self, taskid: str, reason: str) -> None:
        """Remember and log why this node gave a job back (the heartbeat carries it)."""
        self._refusal = (time.monotonic(), reason)
        log.warning("task %s: job given back for another node: %s", taskid, reason)

    # ---- the replicate job ------------------------------------------------------------------
    def run_replicate(self, taskid: str, deadline: int | None = None) -> JobOutcome:
        """Compute and contribute one replicate of ``taskid``. Raises JobRefused(requeue=True)
        when the job should go back to the queue for another worker."""
        task = self.client.view_task(taskid)
        # a first filter only (the scheduler checks the deadline again before authorizing):
        # a chain time a few seconds old is enough, and saves a block read per job
        now = self.client.block_timestamp(max_age=5.0)
        if task.status != ChainTaskStatus.ACTIVE:
            return JobOutcome(taskid, "DROPPED", f"task is {task.status.name} on chain")
        if task.contribution_deadline <= now:
            return JobOutcome(taskid, "DROPPED", "contribution deadline passed")
        deal = self.client.view_deal(task.dealid)
        problem = self.cannot_take(deal)
        if problem:
            self.refuse(taskid, problem)
            raise JobRefused(problem, requeue=True)
        try:
            authorization, fast, enclave = self.authorize(taskid)
        except JobRefused as exc:
            if exc.requeue:
                raise
            return JobOutcome(taskid, "DROPPED", str(exc))
        except AnswerLost as exc:
            # the answer was lost (a cut link, a broker failover, a slow scheduler): a
            # replicate may have been granted that this node will never run. Give it up so
            # that the scheduler plans another, and put the job back.
            self.report(taskid, R.ABORTED, reason=f"authorization answer lost: {exc}"[:2000])
            raise RetryableError(f"authorization answer lost: {exc}") from exc
        if not fast and self.expects_fast_path(deal):
            # the scheduler asked for the classic contribute after all: it locks stake
            short = self.stake_shortfall(deal)
            if short:
                self.refuse(taskid, short)
                return self._fail(taskid, R.ABORTED, short)
        with self._busy_lock:
            self.busy += 1
        try:
            return self._compute(
                taskid, task.dealid, task.idx, task.timeref, authorization, fast, enclave
            )
        except RetryableError as exc:
            # the chain stayed out of reach (a cut link): the authorization is spent, so a
            # retried job could not get another one; the scheduler plans a new replicate
            return self._fail(taskid, R.ABORTED, f"chain node unreachable: {exc}")
        finally:
            with self._busy_lock:
                self.busy -= 1

    def _compute(
        self,
        taskid: str,
        dealid: str,
        index: int,
        timeref: int,
        authorization: str,
        fast: bool = False,
        enclave: str = ZERO_ADDRESS,
    ) -> JobOutcome:
        self.report(taskid, R.STARTING)
        deal = self.client.view_deal(dealid)
        if is_tee(deal.tag):  # its TDX sequence (workers/tee.py), never a standard run
            return tee_mod.compute(self, taskid, deal, index, timeref, authorization, enclave)
        task_dir = self.workdir / taskid
        shutil.rmtree(task_dir, ignore_errors=True)
        in_dir, out_dir = task_dir / "iexec_in", task_dir / "iexec_out"
        in_dir.mkdir(parents=True)
        out_dir.mkdir(parents=True)
        # what a restarted node needs to compute this replicate again (see resume)
        _write_json(task_dir / "state.json", {"authorization": authorization, "fastPath": fast})

        params = inputs_mod.parse_deal_params(deal.params)
        has_callback = int(deal.callback, 16) != 0
        # iexec-worker v9's check at start: what this pool cannot honour is refused before
        # the app is pulled, so nothing runs and nothing is published
        refused = inputs_mod.refusal(
            params, tee=bool(tag_to_int(deal.tag) & 1), callback=has_callback
        )
        if refused:
            return self._fail(taskid, R.START_FAILED, refused, cause=Cause.TASK_DESCRIPTION_INVALID)

        self.report(taskid, R.APP_DOWNLOADING)
        try:
            image = self.client.app_multiaddr(deal.app.pointer).decode()
            self.runner.ensure_image(image)
        except (AppImageError, UnicodeDecodeError) as exc:
            return self._fail(
                taskid,
                R.APP_DOWNLOAD_FAILED,
                f"app image: {exc}",
                cause=Cause.APP_IMAGE_DOWNLOAD_FAILED,
            )
        try:
            args = inputs_mod.split_args(params.iexec_args)
        except inputs_mod.ArgsError as exc:
            return self._fail(
                taskid,
                R.COMPUTE_FAILED,
                f"bad iexec_args: {exc}",
                cause=Cause.TASK_DESCRIPTION_INVALID,
            )
        cause = Cause.INPUT_FILES_DOWNLOAD_FAILED
        try:
            names = inputs_mod.download_inputs(
                params.iexec_input_files,
                in_dir,
                max_bytes=self.settings.app_input_limit_mb * MB,
                timeout=60,
            )
            has_dataset = int(deal.dataset.pointer, 16) != 0
            if has_dataset:
                cause = Cause.DATASET_FILE_DOWNLOAD_FAILED
                multiaddr, checksum = self._dataset_location(deal.dataset.pointer)
                inputs_mod.download_dataset(
                    multiaddr,
                    checksum,
                    in_dir,
                    deal.dataset.pointer,
                    max_bytes=self.settings.app_input_limit_mb * MB,
                    timeout=60,
                )
        except inputs_mod.DataDownloadError as exc:
            if "checksum mismatch" in str(exc):
                cause = Cause.DATASET_FILE_BAD_CHECKSUM
            return self._fail(taskid, R.DATA_DOWNLOAD_FAILED, str(exc), cause=cause)
        env = inputs_mod.app_env(
            deal_id=dealid,
            task_id=taskid,
            task_index=index,
            bot_first=deal.bot_first,
            bot_size=deal.bot_size,
            input_file_names=names,
            dataset_address=deal.dataset.pointer if has_dataset else None,
        )

        self.report(taskid, R.COMPUTING)
        run = AppRun(
            task_id=taskid,
            deal_id=dealid,
            task_index=index,
            bot_first=deal.bot_first,
            bot_size=deal.bot_size,
            image=image,
            args=args,
            input_dir=in_dir,
            output_dir=out_dir,
            env=env,
            timeout=float(
                min(timeref, self.settings.app_max_runtime)
                if self.settings.app_max_runtime
                else timeref
            ),
            memory_bytes=self.settings.app_memory_mb * MB,
            nano_cpus=int(self.settings.app_cpus * 1e9),
            output_limit_bytes=self.settings.app_output_limit_mb * MB,
            network=self.settings.app_network,
            name=f"wp-{self.address[2:10].lower()}-{taskid[2:18]}",
            labels={WORKER_LABEL: self.address.lower(), BROKER_LABEL: self.broker_id},
        )
        try:
            outcome = self.runner.run(run)
        except EngineError as exc:  # not the app's fault: ABORTED, the scheduler plans it again
            return self._fail(
                taskid, R.ABORTED, f"container engine failure: {exc}", cause=Cause.ABORTED_BY_WORKER
            )
        except RunnerError as exc:
            return self._fail(
                taskid, R.COMPUTE_FAILED, f"container: {exc}", cause=Cause.APP_COMPUTE_FAILED
            )
        limits_hit = outcome.timed_out or outcome.oom_killed or outcome.output_too_large
        if outcome.error and outcome.exit_code is None and not limits_hit:
            # the engine lost track of the container: not the app's fault, so the replicate
            # is ABORTED (the scheduler plans it again) rather than COMPUTE_FAILED
            return self._fail(
                taskid,
                R.ABORTED,
                f"container engine failure: {outcome.error}",
                cause=Cause.ABORTED_BY_WORKER,
            )
        if not outcome.ok:
            return self._fail(
                taskid,
                R.COMPUTE_FAILED,
                outcome.reason(),
                cause=Cause.APP_COMPUTE_TIMEOUT if outcome.timed_out else Cause.APP_COMPUTE_FAILED,
                log_tail=outcome.log_tail,
                exit_code=outcome.exit_code,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
            )
        try:
            results_mod.write_logs(out_dir, outcome.stdout, outcome.stderr)
            computed = results_mod.read_computed(out_dir)
            digest = results_mod.result_digest(out_dir, computed, has_callback)
            zip_path = results_mod.package(
                out_dir,
                task_dir / "result.zip",
                max_bytes=self.settings.app_output_limit_mb * MB,
            )
        except results_mod.ResultError as exc:
            return self._fail(
                taskid,
                R.COMPUTE_FAILED,
                str(exc),
                cause=Cause.POST_COMPUTE_FAILED_UNKNOWN_ISSUE,
                log_tail=outcome.log_tail,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
            )
        state = {
            "digest": digest,
            "zip": str(zip_path),
            "callbackData": computed.callback_data or "",
            "callback": deal.callback if has_callback else "",
            "authorization": authorization,
            "fastPath": fast,
        }
        _write_json(task_dir / "state.json", state)
        # the digest stays here until the reveal: sent anywhere, a lazy worker could
        # contribute it without computing
        self.report(
            taskid,
            R.COMPUTED,
            duration=outcome.duration,
            stdout=outcome.stdout or None,
            stderr=outcome.stderr or None,
        )
        # the compute slot ends here: contributing is the control process's job
        self.messages.contribute(self.address, taskid)
        return JobOutcome(taskid, str(R.COMPUTED))

    def contribute(self, taskid: str) -> JobOutcome:
        """Contribute a computed result (control process: never waits behind a computation).
        A request for a task this node computed nothing for is not its own (anyone who can
        write to Redis can send one): it is dropped, with no report."""
        try:
            state = self._state(taskid)
        except PocoError as exc:
            log.warning("task %s: contribute asked, nothing computed here: ignored", taskid)
            return JobOutcome(taskid, "DROPPED", str(exc))
        if state.get("tee"):  # contributeAndFinalize with the enclave's signature
            return tee_mod.contribute(self, taskid, state)
        digest = state["digest"]
        if self.settings.fault_inject == "wrong-digest":
            digest = "0x" + bytes(b ^ 0xFF for b in bytes.fromhex(digest[2:])).hex()
            log.warning("FAULT INJECTION: contributing a wrong digest for %s", taskid)
            state["digest"] = digest
            _write_json(self.workdir / taskid / "state.json", state)
        gas = self.gas()
        if gas.empty:  # iexec-worker: OUT_OF_GAS before contribute, rather than a node error
            return self._fail(taskid, R.CONTRIBUTE_FAILED, gas.describe(self.address))
        if state.get("fastPath"):
            return self._contribute_and_finalize(taskid, state)
        self.report(taskid, R.CONTRIBUTING)
        if self.settings.fault_inject == "crash-before-contribute":
            _crash(f"before contributing to {taskid}")
        try:
            receipt = actions.contribute(self.wallet, taskid, digest, state["authorization"])
        except TransactionReverted as exc:
            if self._on_chain(taskid) in _CONTRIBUTED:  # a resent request, or a resumed one
                self.report(taskid, R.CONTRIBUTED, note="already contributed on chain")
                return JobOutcome(taskid, str(R.CONTRIBUTED))
            return self._fail(
                taskid, R.CONTRIBUTE_FAILED, str(exc), cause=Cause.CHAIN_RECEIPT_NOT_VALID
            )
        if self.settings.fault_inject == "crash-after-contribute":
            _crash(f"after contributing to {taskid}, before reporting it")
        self.report(taskid, R.CONTRIBUTED, tx_hash=receipt.tx_hash)
        return JobOutcome(taskid, str(R.CONTRIBUTED))

    def _contribute_and_finalize(self, taskid: str, state: dict[str, Any]) -> JobOutcome:
        """Trust 1: publish the result, then contribute, reveal and finalize in one
        transaction (PoCo's contributeAndFinalize); the scheduler only records it. Falls back
        to the classic contribute when publishing fails (the upload is then asked later)."""
        self.report(taskid, R.CONTRIBUTING, note="contributeAndFinalize")
        try:
            link, callback_data = self._result_link(taskid, state)
        except PublishError as exc:
            log.warning(
                "task %s: publishing failed (%s): contributing without finalizing", taskid, exc
            )
            state["fastPath"] = False
            _write_json(self.workdir / taskid / "state.json", state)
            return self.contribute(taskid)
        try:
            receipt = actions.contribute_and_finalize(
                self.wallet,
                taskid,
                state["digest"],
                link.encode(),
                state["authorization"],
                bytes.fromhex(callback_data.removeprefix("0x")) if callback_data else b"",
            )
        except TransactionReverted as exc:
            if self._on_chain(taskid) == ContributionStatus.PROVED:  # sent twice: it is done
                receipt = None
            else:
                return self._fail(
                    taskid, R.CONTRIBUTE_FAILED, str(exc), cause=Cause.CHAIN_RECEIPT_NOT_VALID
                )
        self.report(
            taskid,
            R.COMPLETED,
            tx_hash=receipt.tx_hash if receipt else None,
            result_link=link,
            callback_data=callback_data,
            finalized=True,
        )
        return JobOutcome(taskid, str(R.COMPLETED))

    def _on_chain(self, taskid: str) -> ContributionStatus:
        return self.client.view_contribution(taskid, self.address).status

    def _dataset_location(self, dataset: str) -> tuple[str, str]:
        contract = self.client.contract("Dataset", dataset)
        multiaddr = self.client.rpc(
            "Dataset.m_datasetMultiaddr",
            lambda: bytes(contract.functions.m_datasetMultiaddr().call()),
        )
        checksum = self.client.rpc(
            "Dataset.m_datasetChecksum",
            lambda: bytes(contract.functions.m_datasetChecksum().call()),
        )
        return multiaddr.decode(), "0x" + checksum.hex()

    def _fail(
        self,
        taskid: str,
        status: ReplicateStatus,
        reason: str,
        *,
        cause: Cause | None = None,
        log_tail: str | None = None,
        exit_code: int | None = None,
        stdout: str | None = None,
        stderr: str | None = None,
    ) -> JobOutcome:
        log.warning("task %s: %s: %s", taskid, status, reason)
        # URLs masked: an RPC URL in an error text may hold the node's API key
        reason = redact_urls(reason)[:2000]
        self.report(
            taskid,
            status,
            reason=reason,
            cause=cause,
            log_tail=log_tail,
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr or None,
        )
        return JobOutcome(taskid, str(status), reason)

    # ---- reveal and upload, asked by the scheduler --------------------------------------------
    def _state(self, taskid: str) -> dict[str, Any]:
        path = self.workdir / taskid / "state.json"
        try:
            state: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise PocoError(f"no local result for task {taskid}: {exc}") from exc
        return state

    def reveal(self, taskid: str) -> JobOutcome:
        """Reveal our contribution, once the chain says it is a winner (a request may come
        from anyone who can write to Redis: one that comes early, or for a task we did not
        win, is dropped with no report, as iexec-worker checks before revealing)."""
        task = self.client.view_task(taskid)
        mine = self.client.view_contribution(taskid, self.address)
        if mine.status == ContributionStatus.PROVED:
            self.report(taskid, R.REVEALED, note="already revealed on chain")
            return JobOutcome(taskid, str(R.REVEALED))
        if (
            task.status != ChainTaskStatus.REVEALING
            or mine.status != ContributionStatus.CONTRIBUTED
            or mine.result_hash != task.consensus_value
        ):
            why = f"task {task.status.name}, our contribution {mine.status.name}"
            log.warning("task %s: reveal asked, not a winner to reveal (%s): ignored", taskid, why)
            return JobOutcome(taskid, "DROPPED", why)
        try:
            state = self._state(taskid)
        except PocoError as exc:
            return self._fail(taskid, R.REVEAL_FAILED, str(exc), cause=Cause.CANNOT_REVEAL)
        gas = self.gas()
        if gas.empty:
            return self._fail(
                taskid, R.REVEAL_FAILED, gas.describe(self.address), cause=Cause.CANNOT_REVEAL
            )
        self.report(taskid, R.REVEALING)
        try:
            receipt = actions.reveal(self.wallet, taskid, state["digest"])
        except TransactionReverted as exc:
            if self._on_chain(taskid) == ContributionStatus.PROVED:  # revealed already
                self.report(taskid, R.REVEALED, note="already revealed on chain")
                return JobOutcome(taskid, str(R.REVEALED))
            return self._fail(
                taskid, R.REVEAL_FAILED, str(exc), cause=Cause.CHAIN_RECEIPT_NOT_VALID
            )
        self.report(taskid, R.REVEALED, tx_hash=receipt.tx_hash)
        return JobOutcome(taskid, str(R.REVEALED))

    def upload(self, taskid: str) -> JobOutcome:
        state = self._state(taskid)
        # a request to upload may come from anyone who can write to Redis: the result is
        # published only once this node revealed (the chain is closed to contributions then),
        # never while a free-rider could still contribute a digest computed from it
        mine = self._on_chain(taskid)
        if mine != ContributionStatus.PROVED:
            log.warning("task %s: upload asked before our reveal (%s): ignored", taskid, mine.name)
            return JobOutcome(taskid, "DROPPED", f"not revealed on chain ({mine.name})")
        self.report(taskid, R.RESULT_UPLOADING)
        link, callback_data = self._result_link(taskid, state)
        self.report(taskid, R.RESULT_UPLOADED, result_link=link, callback_data=callback_data)
        return JobOutcome(taskid, str(R.RESULT_UPLOADED))

    def _result_link(self, taskid: str, state: dict[str, Any]) -> tuple[str, str]:
        """Publish the zipped result (or, for a callback, point at it on chain): the link
        finalize records, and the callback data."""
        if state.get("callback"):
            link = result_link("ethereum", state["callback"])
        else:
            data = Path(state["zip"]).read_bytes()
            link = result_link(self.publisher.storage, self.publisher.publish(taskid, data))
        return link, str(state.get("callbackData", ""))

    # ---- after a restart ------------------------------------------------------------------
    def resume(self) -> list[JobOutcome]:
        """Pick up the replicates a previous life of this node left half-done, where the
        chain says they are. Runs once when the node starts, on the task directories that
        were there before it took any job (:attr:`leftovers`; jobs may run beside it):

        * contributed, consensus reached on our result, reveal deadline ahead → reveal;
        * contributed, no consensus yet → tell the scheduler (it may have missed it);
        * revealed → tell the scheduler (it may ask for the upload);
        * computed, not contributed, contribution deadline ahead → contribute;
        * authorized but not computed, enough time left to run the app → compute again
          (the containers of the previous life are removed first);
        * anything else (task final, deadlines passed, rejected) → its directory is removed.
        """
        outcomes = []
        try:
            self.runner.remove_leftovers(
                {WORKER_LABEL: self.address.lower(), BROKER_LABEL: self.broker_id}
            )
        except Exception as exc:  # Docker down: the janitor retries later
            log.warning("resume: could not remove leftover containers: %s", exc)
        for taskid in self.leftovers:
            state_file = self.workdir / taskid / "state.json"
            try:
                outcome = self._resume_one(taskid, json.loads(state_file.read_text()))
            except (OSError, ValueError, PocoError) as exc:
                log.warning("resume %s: %s", taskid, exc)
                continue
            log.info("resume %s: %s %s", taskid, outcome.status, outcome.reason)
            outcomes.append(outcome)
            if outcome.status == "DROPPED":
                shutil.rmtree(state_file.parent, ignore_errors=True)
        return outcomes

    def _resume_one(self, taskid: str, state: dict[str, Any]) -> JobOutcome:
        task = self.client.view_task(taskid)
        if task.status not in (ChainTaskStatus.ACTIVE, ChainTaskStatus.REVEALING):
            return JobOutcome(taskid, "DROPPED", f"task is {task.status.name} on chain")
        mine = self.client.view_contribution(taskid, self.address)
        now = self.client.block_timestamp()
        if mine.status == ContributionStatus.PROVED:
            self.report(taskid, R.REVEALED, note="resumed after a restart")
            return JobOutcome(taskid, str(R.REVEALED), "revealed before the restart")
        if mine.status == ContributionStatus.CONTRIBUTED:
            self.report(taskid, R.CONTRIBUTED, note="resumed after a restart")
            if task.status != ChainTaskStatus.REVEALING:
                return JobOutcome(taskid, str(R.CONTRIBUTED), "waiting for consensus")
            if mine.result_hash != task.consensus_value or now >= task.reveal_deadline:
                return JobOutcome(taskid, "DROPPED", "not a winner, or reveal deadline passed")
            self.messages.reveal(self.address, taskid)
            return JobOutcome(taskid, str(R.REVEALING), "reveal sent")
        if mine.status != ContributionStatus.UNSET or task.status != ChainTaskStatus.ACTIVE:
            return JobOutcome(taskid, "DROPPED", f"contribution {mine.status.name}, too late")
        if task.contribution_deadline <= now:
            return JobOutcome(taskid, "DROPPED", "contribution deadline passed")
        if state.get("digest"):
            self.report(taskid, R.COMPUTED, note="resumed")
            self.messages.contribute(self.address, taskid)
            return JobOutcome(taskid, str(R.CONTRIBUTING), "contribute sent")
        if task.contribution_deadline - now < task.timeref * RECOMPUTE_TIME_RATIO:
            return JobOutcome(taskid, "DROPPED", "too little time left to compute again")
        with self._busy_lock:
            self.busy += 1
        try:
            return self._compute(
                taskid,
                task.dealid,
                task.idx,
                task.timeref,
                str(state["authorization"]),
                bool(state.get("fastPath")),
                str(state.get("enclave") or ZERO_ADDRESS),
            )
        finally:
            with self._busy_lock:
                self.busy -= 1

    def heartbeat_forever(self, period: float, stop: threading.Event) -> None:
        """Heartbeat, renew the identity lease and the liveness key; runs on a thread of the
        compute process until ``stop``. Nothing slow here (no Docker call: a busy engine once
        took 60 s to list containers and the node was judged LOST): the janitor has its own
        thread."""
        while not stop.is_set():
            try:
                if self.lease is not None:
                    self.lease.renew()  # LeaseLost propagates: the node must stop
                envelope = self.heartbeat()
                if self.redis is not None:
                    # liveness straight into Redis: the scheduler judges LOST on this (the
                    # signed heartbeat: nobody else can write a fresher one), not on heartbeat
                    # messages that may wait behind other work in its queue. The alive key
                    # lasts as long as the scheduler waits before judging a node lost, so that
                    # peers never take the containers of a node the pool still counts on
                    ttl = liveness_ttl(self.settings)
                    self.redis.set(keys.node_alive(self.address), self.name, px=int(ttl * 1000))
                    self.redis.set(keys.node_seen(self.address), json.dumps(envelope), ex=86400)
            except LeaseLost:
                raise
            except Exception as exc:  # Redis down: keep trying, keep working
                log.warning("heartbeat failed: %s", exc)
            stop.wait(period)

    def janitor_forever(self, period: float, stop: threading.Event) -> None:
        """Remove orphan app containers every ``period`` seconds until ``stop``, and look at
        the node's gas (logged when it runs low or out, as iexec-worker does)."""
        while not stop.is_set():
            try:
                self.remove_orphans()
            except Exception as exc:  # Docker slow or down: try again next period
                log.warning("orphan container clean-up failed: %s", exc)
            try:
                self.gas(max_age=period)
            except Exception as exc:  # the chain does not answer: the next job checks again
                log.warning("gas balance unknown: %s", exc)
            stop.wait(period)

    def remove_orphans(self) -> int:
        """Remove app containers whose node is gone (killed with -9, host crash): ours from a
        previous life, and those of peers on this Docker host whose liveness key expired."""
        if self.redis is None:
            return 0
        removed = 0
        label_values = getattr(self.runner, "label_values", None)
        # only containers of nodes sharing our broker: another pool on this Docker host (or a
        # test run beside this one) may use the same worker address with its own Redis
        mine = {BROKER_LABEL: self.broker_id}
        workers = label_values(WORKER_LABEL, mine) if label_values else set()
        for worker in workers:
            # ours: the runner keeps the containers it runs now; a peer's: only if it is dead
            if worker != self.address.lower() and self.redis.exists(keys.node_alive(worker)):
                continue
            removed += self.runner.remove_leftovers({WORKER_LABEL: worker, **mine})
        if removed:
            log.warning("removed %d orphan app container(s)", removed)
        return removed


def _crash(where: str) -> None:
    """FAULT INJECTION (tests only): die like ``kill -9`` of the whole node, now."""
    log.critical("FAULT INJECTION: killing this node %s", where)
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # never a half-written state after a crash


def _memory_mb() -> int:
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    return int(pages // MB)
