"""A worker node: take a replicate job, get the scheduler's authorization, run the app,
contribute; later reveal and upload when the scheduler asks.

The node reads everything it needs about a task from the chain (the job message carries only
the task id and its deadline) and reports each status change to the scheduler as a message
(``scheduler.replicate_update``); it never touches MongoDB, so nodes need only Redis and the
chain to join a pool. What it must remember between contribute and reveal/upload (the result
digest and the zipped output) stays in its work directory, keyed by task id.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
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
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypedDict, Unpack

from poco import actions
from poco.chain import ChainClient, Wallet
from poco.errors import PocoError, RetryableError, TransactionReverted
from poco.funds import GasCheck, format_rlc, gas_check
from poco.orders import ZERO_ADDRESS
from poco.proofs import recover_abort_signer
from poco.results import callback_bytes, result_link
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
from workers import mounts
from workers import results as results_mod
from workers import tee as tee_mod
from workers.identity import IndexLease, LeaseLost, liveness_ttl
from workers.publishers import PublishError, ResultPublisher
from workers.reporting import Reporter
from workers.runner import (
    AppImageError,
    AppRun,
    ContainerRunner,
    EngineError,
    OutputMountError,
    RunnerError,
)

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
# in a task's folder: the error result's own output folder, and the word the control process
# leaves for the compute process when the scheduler aborts the replicate
ERROR_DIR = "error_out"
ABORT_MARKER = "aborted.json"
# a folder holding only that word is deleted by the janitor after this many seconds
ABORT_MARKER_TTL = 120.0
# errors of the node's own storage while packaging a result (not the app's doing)
NODE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM})


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
    keep: bool = False  # the task's folder is still needed (a contribution is to come)


@dataclass
class _Job:
    """One computation of a replicate: what its error result needs."""

    taskid: str
    task_dir: Path
    authorization: str
    fast: bool
    has_callback: bool = False


class _RunLogs(TypedDict, total=False):
    """What a report says of the app's run."""

    log_tail: str | None
    exit_code: int | None
    stdout: str | None
    stderr: str | None
    duration: float | None


class _Aborted(Exception):
    """The scheduler aborted the replicate while it was being computed."""


@contextlib.contextmanager
def task_lock(task_dir: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold ``task_dir`` (created if missing) locked against the node's other process and
    threads (``flock`` on the folder): yields True when held, False when someone else holds
    it and ``wait`` is False. The compute process holds it while it computes; the control
    process (abort) and the janitor only take it when free."""
    for attempt in range(3):
        task_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(task_dir, os.O_RDONLY | os.O_DIRECTORY)
            break
        except FileNotFoundError:  # deleted between the two calls
            if attempt == 2:
                raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def purge_dir(task_dir: Path) -> None:
    """Delete a task's folder, the app output's filesystem unmounted first."""
    with contextlib.suppress(OSError):
        mounts.unmount(task_dir / "iexec_out")
    shutil.rmtree(task_dir, ignore_errors=True)
    if task_dir.exists():  # something in it could not be deleted: say so, the janitor retries
        log.warning("could not delete all of %s", task_dir)


def _clear(task_dir: Path) -> None:
    """Empty ``task_dir`` (kept: the caller holds it locked)."""
    with contextlib.suppress(OSError):
        mounts.unmount(task_dir / "iexec_out")
    for entry in list(task_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


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
        self.reporter = Reporter(messages.report)
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
        # where input files and datasets may be fetched from
        self.download_policy = inputs_mod.AddressPolicy.from_settings(
            settings.download_allow_private, settings.download_private_hosts
        )
        self._tmpfs: bool | None = None  # whether the output tmpfs can be mounted (None: untried)
        self._pool_owners: dict[str, str] = {}  # workerpool -> owner (who may abort)

    # ---- messages to the scheduler ----------------------------------------------------------
    def report(self, taskid: str, status: ReplicateStatus, **fields: Unpack[ReportFields]) -> None:
        """Tell the scheduler this node's replicate of ``taskid`` is now ``status``
        (``fields``: what :class:`~pool.messages.ReplicateReport` carries beside it). A
        progress status may go with the next report (workers/reporting.py)."""
        self.reporter.report(ReplicateReport(taskid, self.address, status, **fields))

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
        timeout = self.authorization_timeout
        answer = self.messages.authorize(
            AuthorizeRequest(taskid, self.address, ZERO_ADDRESS, expires_at=time.time() + timeout),
            timeout,
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
                return self._fail(
                    taskid, R.ABORTED, short, cause=Cause.ABORTED_BY_WORKER, node_fault=True
                )
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
        """Run the app of ``taskid`` and hand its result (or an error result) to the control
        process. Every way out reports: COMPUTED, a failure followed by an error result,
        ABORTED for the node's own failures (with ``node_fault``), or nothing when the
        scheduler aborted the replicate (the control process reported it). The task's folder
        is kept only while a contribution is to come."""
        task_dir = self.workdir / taskid
        with task_lock(task_dir) as _:
            if self._abort_requested(taskid):
                self.purge(taskid)
                return JobOutcome(taskid, str(R.ABORTED), "aborted before it started")
            _clear(task_dir)  # what a previous life left of this task
            job = _Job(taskid, task_dir, authorization, fast)
            outcome = JobOutcome(taskid, str(R.ABORTED), "node error")
            try:
                outcome = self._compute_locked(job, dealid, index, timeref, enclave)
            except _Aborted as exc:
                outcome = JobOutcome(taskid, str(R.ABORTED), str(exc))
            except Exception as exc:  # a bug or a surprise: still a report, never a silence
                if isinstance(exc, PocoError):
                    why, cause = f"chain: {exc}", Cause.CHAIN_UNREACHABLE
                else:
                    log.exception("task %s: the node failed while computing", taskid)
                    why, cause = f"node error: {type(exc).__name__}: {exc}", None
                try:
                    outcome = self._node_fault(job, why, cause)
                except _Aborted as aborted:
                    outcome = JobOutcome(taskid, str(R.ABORTED), str(aborted))
            finally:
                try:
                    mounts.unmount(task_dir / "iexec_out")
                except OSError as exc:
                    log.warning("task %s: could not unmount the app output: %s", taskid, exc)
                if not outcome.keep:
                    self.purge(taskid)
            return outcome

    def _compute_locked(
        self, job: _Job, dealid: str, index: int, timeref: int, enclave: str
    ) -> JobOutcome:
        taskid, task_dir = job.taskid, job.task_dir
        self.report(taskid, R.STARTING)
        deal = self.client.view_deal(dealid)
        if is_tee(deal.tag):  # its TDX sequence (workers/tee.py), never a standard run
            return tee_mod.compute(self, taskid, deal, index, timeref, job.authorization, enclave)
        job.has_callback = int(deal.callback, 16) != 0
        in_dir, out_dir = task_dir / "iexec_in", task_dir / "iexec_out"
        in_dir.mkdir(parents=True)
        out_dir.mkdir(parents=True)
        # what a restarted node needs to compute this replicate again (see resume)
        _write_json(
            task_dir / "state.json", {"authorization": job.authorization, "fastPath": job.fast}
        )

        params = inputs_mod.parse_deal_params(deal.params)
        # iexec-worker v9's check at start: what this pool cannot honour is refused before
        # the app is pulled (START_FAILED, no error result: nothing is published)
        refused = inputs_mod.refusal(
            params, tee=bool(tag_to_int(deal.tag) & 1), callback=job.has_callback
        )
        if not refused:
            try:
                args = inputs_mod.split_args(params.iexec_args)
            except inputs_mod.ArgsError as exc:
                refused = f"bad iexec_args: {exc}"
        if refused:
            self._checkpoint(job)
            return self._fail(taskid, R.START_FAILED, refused, cause=Cause.TASK_DESCRIPTION_INVALID)

        self.report(taskid, R.APP_DOWNLOADING)
        image_cause = Cause.APP_IMAGE_DOWNLOAD_FAILED
        try:
            image = self.client.app_multiaddr(deal.app.pointer).decode()
            self.runner.ensure_image(image)
        except UnicodeDecodeError as exc:
            return self._error_result(
                job, R.APP_DOWNLOAD_FAILED, image_cause, f"app image: not a name: {exc}"
            )
        except AppImageError as exc:
            if exc.node_fault:
                return self._node_fault(job, f"app image: {exc}", image_cause)
            return self._error_result(job, R.APP_DOWNLOAD_FAILED, image_cause, f"app image: {exc}")
        except EngineError as exc:
            return self._node_fault(job, f"container engine failure: {exc}", image_cause)
        self._checkpoint(job)

        # the task's time (the category's, or less) is shared by the downloads and the app
        app_time = min(timeref, self.settings.app_max_runtime or timeref)
        deadline = time.monotonic() + app_time
        budget = inputs_mod.DownloadBudget(
            max_file=self.settings.app_input_limit_mb * MB,
            max_total=self.settings.app_input_total_mb * MB,
            deadline=deadline,
        )
        has_dataset = int(deal.dataset.pointer, 16) != 0
        # iexec-worker's order: the dataset, then the input files
        cause = Cause.DATASET_FILE_DOWNLOAD_FAILED
        try:
            if has_dataset:
                multiaddr, checksum = self._dataset_location(deal.dataset.pointer)
                inputs_mod.download_dataset(
                    multiaddr,
                    checksum,
                    in_dir,
                    deal.dataset.pointer,
                    max_bytes=budget.max_file,
                    budget=budget,
                    policy=self.download_policy,
                )
            cause = Cause.INPUT_FILES_DOWNLOAD_FAILED
            names = inputs_mod.download_inputs(
                params.iexec_input_files,
                in_dir,
                max_bytes=budget.max_file,
                budget=budget,
                max_files=self.settings.app_input_files_max,
                policy=self.download_policy,
            )
        except inputs_mod.ChecksumError as exc:
            return self._error_result(
                job, R.DATA_DOWNLOAD_FAILED, Cause.DATASET_FILE_BAD_CHECKSUM, str(exc)
            )
        except inputs_mod.DataDownloadError as exc:
            if exc.node_fault:
                return self._node_fault(job, str(exc), cause)
            return self._error_result(job, R.DATA_DOWNLOAD_FAILED, cause, str(exc))
        self._checkpoint(job)
        remaining = deadline - time.monotonic()
        if remaining < 1:
            return self._error_result(
                job,
                R.DATA_DOWNLOAD_FAILED,
                cause,
                f"the downloads took the task's whole time ({app_time} s): nothing left to run "
                "the app",
            )
        env = inputs_mod.app_env(
            deal_id=dealid,
            task_id=taskid,
            task_index=index,
            bot_first=deal.bot_first,
            bot_size=deal.bot_size,
            input_file_names=names,
            dataset_address=deal.dataset.pointer if has_dataset else None,
        )
        output_limit = self.settings.app_output_limit_mb * MB
        mounted = self._mount_output(out_dir, output_limit)

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
            # whole seconds (a limit of "10 s", not of "9.99989 s" when nothing was downloaded)
            timeout=float(round(remaining)),
            memory_bytes=self.settings.app_memory_mb * MB,
            nano_cpus=int(self.settings.app_cpus * 1e9),
            output_limit_bytes=output_limit,
            network=self.settings.app_network,
            name=self.container_name(taskid),
            labels={WORKER_LABEL: self.address.lower(), BROKER_LABEL: self.broker_id},
            tmp_bytes=self.settings.app_tmp_mb * MB,
            output_mounted=mounted,
        )
        try:
            try:
                outcome = self.runner.run(run)
            except OutputMountError as exc:  # the engine looks under the tmpfs: measure instead
                self._give_up_output_mount(out_dir, exc)
                outcome = self.runner.run(replace(run, output_mounted=False))
        except EngineError as exc:  # not the app's fault: the scheduler plans it elsewhere
            self._checkpoint(job)
            return self._node_fault(job, f"container engine failure: {exc}")
        except RunnerError as exc:  # e.g. the image vanished from the engine meanwhile
            self._checkpoint(job)
            return self._node_fault(job, f"container: {exc}", Cause.APP_NOT_FOUND_LOCALLY)
        self._checkpoint(job)  # stopped on the scheduler's request: nothing to report
        logs: _RunLogs = {
            # the end of a failed run's output goes with the failure (a successful run's
            # output is the requester's only: its compute logs)
            "log_tail": None if outcome.ok else outcome.log_tail,
            "exit_code": outcome.exit_code,
            "stdout": outcome.stdout or None,
            "stderr": outcome.stderr or None,
            "duration": outcome.duration,
        }
        limits_hit = outcome.timed_out or outcome.oom_killed or outcome.output_too_large
        if outcome.error and outcome.exit_code is None and not limits_hit:
            if outcome.error_is_the_apps:
                return self._error_result(
                    job, R.COMPUTE_FAILED, Cause.APP_COMPUTE_FAILED, outcome.reason(), **logs
                )
            # the engine lost track of the container: not the app's fault
            return self._node_fault(job, f"container engine failure: {outcome.error}")
        if outcome.output_too_large:  # what it wrote is cut: never contributed
            return self._error_result(
                job, R.COMPUTE_FAILED, Cause.APP_COMPUTE_FAILED, outcome.reason(), **logs
            )
        # iexec-worker v9.2: an app that failed (exit code, time limit, memory) still
        # contributes what its computed.json says, when it left a usable one
        app_cause = (
            None
            if outcome.ok
            else Cause.APP_COMPUTE_TIMEOUT
            if outcome.timed_out
            else Cause.APP_COMPUTE_FAILED
        )
        stage = Cause.POST_COMPUTE_COMPUTED_FILE_NOT_FOUND
        try:
            if outcome.ok:  # iexec-worker writes the logs after a successful run only
                results_mod.write_logs(out_dir, outcome.stdout, outcome.stderr)
            computed = results_mod.read_computed(out_dir)
            stage = Cause.POST_COMPUTE_RESULT_DIGEST_COMPUTATION_FAILED
            digest = results_mod.result_digest(out_dir, computed, job.has_callback)
            callback_data = (
                "0x" + results_mod.callback_bytes(computed.callback_data).hex()
                if job.has_callback
                else ""
            )
            stage = Cause.POST_COMPUTE_OUT_FOLDER_ZIP_FAILED
            zip_path = results_mod.package(out_dir, task_dir / "result.zip", max_bytes=output_limit)
        except (results_mod.ResultError, OSError, RecursionError) as exc:
            if isinstance(exc, OSError) and exc.errno in NODE_ERRNOS:
                return self._node_fault(job, f"packaging the result: {exc}")
            if isinstance(exc, results_mod.NameTooLongError):
                stage = Cause.POST_COMPUTE_TOO_LONG_RESULT_FILE_NAME
            problem = str(exc) if isinstance(exc, results_mod.ResultError) else repr(exc)
            why = problem if outcome.ok else f"{outcome.reason()}; {problem}"
            return self._error_result(job, R.COMPUTE_FAILED, app_cause or stage, why, **logs)
        state = {
            "digest": digest,
            "zip": str(zip_path),
            "callbackData": callback_data,
            "callback": deal.callback if job.has_callback else "",
            "authorization": job.authorization,
            "fastPath": job.fast,
        }
        _write_json(task_dir / "state.json", state)
        self._checkpoint(job)
        # the digest stays here until the reveal: sent anywhere, a lazy worker could
        # contribute it without computing
        self.report(
            taskid,
            R.COMPUTED,
            cause=app_cause,
            reason=None if outcome.ok else outcome.reason(),
            **logs,
        )
        # the compute slot ends here: contributing is the control process's job
        self.messages.contribute(self.address, taskid)
        return JobOutcome(taskid, str(R.COMPUTED), keep=True)

    def container_name(self, taskid: str) -> str:
        """The name of this node's app container for ``taskid`` (the control process stops
        it by this name when the scheduler aborts the replicate)."""
        return f"wp-{self.address[2:10].lower()}-{taskid[2:18]}"

    def check_output_mount(self) -> bool:
        """At start: whether this node can give apps a hard output limit (a tmpfs on
        /iexec_out), tried on a folder of its own; the warning is logged now rather than at
        the first task."""
        if not self.settings.app_output_tmpfs:
            log.warning(
                "WORKERPOOL_APP_OUTPUT_TMPFS=false: the app output limit is enforced by "
                "measuring the output while the app runs (a soft limit)"
            )
            return False
        probe = self.workdir / ".output-mount-probe"
        try:
            probe.mkdir(exist_ok=True)
            return self._mount_output(probe, MB)
        finally:
            with contextlib.suppress(OSError):
                mounts.unmount(probe)
            with contextlib.suppress(OSError):
                probe.rmdir()

    def _mount_output(self, out_dir: Path, limit: int) -> bool:
        """Mount the output tmpfs (WORKERPOOL_APP_OUTPUT_TMPFS) when this node can; whether
        it did. A node that may not mount says so once and measures the output instead."""
        if not self.settings.app_output_tmpfs or self._tmpfs is False:
            return False
        try:
            mounts.mount_tmpfs(out_dir, limit)
        except OSError as exc:
            if exc.errno not in mounts.NOT_PERMITTED:
                raise
            self._tmpfs = False
            log.warning(
                "cannot mount the app output on a tmpfs (%s): WORKERPOOL_APP_OUTPUT_LIMIT_MB is "
                "enforced by measuring the output while the app runs (a fast writer can pass "
                "it by what it writes in a fraction of a second); run the worker as root with "
                "CAP_SYS_ADMIN for a hard limit, or set WORKERPOOL_APP_OUTPUT_TMPFS=false",
                exc,
            )
            return False
        self._tmpfs = True
        return True

    def _give_up_output_mount(self, out_dir: Path, exc: OutputMountError) -> None:
        """The engine binds the folder under the output tmpfs (the node runs in another mount
        namespace than the engine: a container without shared propagation, ``ip netns
        exec``): no run of this node can have the hard limit. Say so once, unmount, empty
        the folder of what the engine wrote into the folder underneath (the probe), and let
        the output be measured while the app runs, as on a node that may not mount."""
        self._tmpfs = False
        log.warning(
            "%s: WORKERPOOL_APP_OUTPUT_LIMIT_MB is enforced by measuring the output while the "
            "app runs from now on (a soft limit; fix the mount for a hard one, or set "
            "WORKERPOOL_APP_OUTPUT_TMPFS=false to say the node measures)",
            exc,
        )
        mounts.unmount(out_dir)
        shutil.rmtree(out_dir)
        out_dir.mkdir()

    def _error_result(
        self,
        job: _Job,
        status: ReplicateStatus,
        cause: Cause,
        reason: str,
        **fields: Unpack[_RunLogs],
    ) -> JobOutcome:
        """End the computation of ``job`` with an error result (iexec-worker v9: the app's or
        the requester's failure is written into the task's output, which is contributed, so
        the task completes at once with the same result on every worker): report ``status``
        with its ``cause`` and hand the error result to the control process."""
        self._checkpoint(job)
        error_dir = job.task_dir / ERROR_DIR
        try:
            shutil.rmtree(error_dir, ignore_errors=True)
            results_mod.write_error_result(error_dir, str(status), [str(cause)])
            digest = results_mod.error_result_digest(error_dir, job.has_callback)
            zip_path = results_mod.package(error_dir, job.task_dir / "result.zip", max_bytes=MB)
            state = {
                "digest": digest,
                "zip": str(zip_path),
                # a callback deal's error result: no callback data (the consumer's
                # receiveResult gets no bytes), the error.txt published for the requester
                "callbackData": "",
                "callback": "",
                "authorization": job.authorization,
                "fastPath": job.fast,
                "errorResult": str(cause),
            }
            _write_json(job.task_dir / "state.json", state)
        except OSError as exc:
            return self._node_fault(job, f"could not write the error result: {exc}", cause)
        log.warning("task %s: %s (%s): contributing an error result", job.taskid, status, reason)
        self.report(
            job.taskid,
            status,
            reason=redact_urls(reason)[:2000],
            cause=cause,
            note="error result",
            **fields,
        )
        self.messages.contribute(self.address, job.taskid)
        return JobOutcome(job.taskid, str(status), reason, keep=True)

    def _node_fault(self, job: _Job, reason: str, cause: Cause | None = None) -> JobOutcome:
        """End ``job`` for a failure of this node (engine, registry seen from here, disk):
        ABORTED with ``node_fault``, so the scheduler plans the replicate on another node
        and counts the failure against this one."""
        self._checkpoint(job)
        log.warning("task %s: node-side failure: %s", job.taskid, reason)
        self.report(
            job.taskid,
            R.ABORTED,
            reason=redact_urls(reason)[:2000],
            cause=cause or Cause.ABORTED_BY_WORKER,
            node_fault=True,
        )
        return JobOutcome(job.taskid, str(R.ABORTED), reason)

    # ---- abort and clean-up --------------------------------------------------------------
    def _abort_requested(self, taskid: str) -> bool:
        return (self.workdir / taskid / ABORT_MARKER).exists()

    def _checkpoint(self, job: _Job) -> None:
        """Stop here when the scheduler aborted the replicate meanwhile."""
        if self._abort_requested(job.taskid):
            raise _Aborted("aborted on the scheduler's request")

    def purge(self, taskid: str) -> None:
        """Delete what this node keeps of ``taskid`` (inputs, output, result, state)."""
        purge_dir(self.workdir / taskid)

    def abort(self, taskid: str, cause: Cause, reason: str, signature: str) -> JobOutcome:
        """The scheduler no longer needs this node's replicate of ``taskid`` (control
        process): stop its container, delete its files, report ABORTED with ``cause``.

        Only the pool owner's word counts (anyone who can write to Redis can send one): the
        request must be signed by the owner of the task's workerpool on chain, otherwise it
        is dropped, nothing stopped, nothing reported.

        The compute process holds the task's folder locked while it works on it: then a
        marker tells it to stop at its next step and the container is stopped now (its slot
        is free as soon as the engine says it exited); otherwise the folder is emptied here,
        the marker left for a job about to start or a contribute request still queued (the
        janitor deletes it after :data:`ABORT_MARKER_TTL` seconds)."""
        problem = self._abort_problem(taskid, cause, reason, signature)
        if problem:
            log.warning("task %s: abort request refused: %s", taskid, problem)
            return JobOutcome(taskid, "DROPPED", f"abort refused: {problem}")
        task_dir = self.workdir / taskid
        with task_lock(task_dir, wait=False) as mine:
            if mine:
                purge_dir(task_dir)
                # the word stays (the janitor deletes it later) for a job about to start, or a
                # contribute request still queued
                task_dir.mkdir(parents=True, exist_ok=True)
                _write_json(task_dir / ABORT_MARKER, {"cause": str(cause), "reason": reason})
            else:
                _write_json(task_dir / ABORT_MARKER, {"cause": str(cause), "reason": reason})
                try:
                    self.runner.kill(self.container_name(taskid))
                except Exception as exc:  # the compute side's run ends it anyway
                    log.warning("task %s: could not stop the app container: %s", taskid, exc)
        log.info("task %s: aborted (%s): %s", taskid, cause, reason)
        self.report(taskid, R.ABORTED, cause=cause, reason=reason or str(cause))
        return JobOutcome(taskid, str(R.ABORTED), reason)

    def _abort_problem(self, taskid: str, cause: Cause, reason: str, signature: str) -> str:
        """Why an abort request is not the pool owner's ("" when it is)."""
        try:
            signer = recover_abort_signer(signature, self.address, taskid, str(cause), reason)
        except ValueError as exc:
            return str(exc)
        try:
            pool = self.client.view_deal(self.client.view_task(taskid).dealid).workerpool.pointer
            owner = self._pool_owners.get(pool) or self.client.workerpool_owner(pool)
        except Exception as exc:  # no such task, or the chain does not answer: not proven
            return f"cannot read the task's workerpool owner: {exc}"
        self._pool_owners[pool] = owner
        if signer.lower() != owner.lower():
            return f"signed by {signer}, not by the workerpool owner {owner}"
        return ""

    def sweep(self, now: int | None = None) -> int:
        """Delete the task folders this node no longer needs (the janitor, every period):
        those of tasks final on chain or past their final deadline, and folders with no
        state left by an abort more than :data:`ABORT_MARKER_TTL` seconds ago. Folders in
        use (locked by a computation) are skipped. Returns how many were deleted."""
        removed = 0
        if now is None:
            now = self.client.block_timestamp()
        for task_dir in sorted(self.workdir.glob("0x*")):
            if not task_dir.is_dir():
                continue
            with task_lock(task_dir, wait=False) as mine:
                if not mine:
                    continue
                if not (task_dir / "state.json").exists():
                    age = time.time() - task_dir.stat().st_mtime
                    if age < ABORT_MARKER_TTL:
                        continue
                else:
                    task = self.client.view_task(task_dir.name)
                    final = task.status in (ChainTaskStatus.COMPLETED, ChainTaskStatus.FAILED)
                    if not final and task.final_deadline > now:
                        continue
                purge_dir(task_dir)
                removed += 1
        if removed:
            log.info("deleted %d task folder(s) no longer needed", removed)
        return removed

    def contribute(self, taskid: str) -> JobOutcome:
        """Contribute a computed result (control process: never waits behind a computation).
        A request for a task this node computed nothing for is not its own (anyone who can
        write to Redis can send one): it is dropped, with no report; so is one for a task
        the scheduler aborted meanwhile (its folder is deleted)."""
        if self._abort_requested(taskid):  # aborted after it was computed: nothing to send
            self.purge(taskid)
            return JobOutcome(taskid, str(R.ABORTED), "aborted on the scheduler's request")
        outcome = self._contribute(taskid)
        if outcome.status in (str(R.CONTRIBUTE_FAILED), str(R.COMPLETED)):
            self.purge(taskid)  # nothing more to do with it: no reveal, no upload
        return outcome

    def _contribute(self, taskid: str) -> JobOutcome:
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
        self.report(taskid, R.CONTRIBUTING)  # (the COMPLETED report says it finalized)
        try:
            link, callback_data = self._result_link(taskid, state)
        except PublishError as exc:
            log.warning(
                "task %s: publishing failed (%s): contributing without finalizing", taskid, exc
            )
            state["fastPath"] = False
            _write_json(self.workdir / taskid / "state.json", state)
            return self._contribute(taskid)
        try:
            receipt = actions.contribute_and_finalize(
                self.wallet,
                taskid,
                state["digest"],
                link.encode(),
                state["authorization"],
                callback_bytes(callback_data),
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
        node_fault: bool = False,
    ) -> JobOutcome:
        log.warning("task %s: %s: %s", taskid, status, reason)
        # URLs masked: an RPC URL in an error text may hold the node's API key
        reason = redact_urls(reason)[:2000]
        self.report(taskid, status, reason=reason, cause=cause, node_fault=node_fault)
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
        """Publish the result and report its link. A request may come from anyone who can
        write to Redis, so the same request may come twice, or before the scheduler's own:
        the result is published once, and only its link is kept afterwards (the janitor
        deletes it when the task is final), so that every later request reports that link
        again rather than finding nothing."""
        try:
            state = self._state(taskid)
        except PocoError as exc:  # nothing here to publish: the scheduler asks another winner
            self.report(taskid, R.REVEALED, reason=f"upload failed: {exc}", upload_failed=True)
            return JobOutcome(taskid, str(R.REVEALED), str(exc))
        # the result is published only once this node revealed (the chain is closed to
        # contributions then), never while a free-rider could still contribute a digest
        # computed from it
        mine = self._on_chain(taskid)
        if mine != ContributionStatus.PROVED:
            log.warning("task %s: upload asked before our reveal (%s): ignored", taskid, mine.name)
            return JobOutcome(taskid, "DROPPED", f"not revealed on chain ({mine.name})")
        self.report(taskid, R.RESULT_UPLOADING)
        task_dir = self.workdir / taskid
        with task_lock(task_dir):  # two requests at once publish once
            state = self._state(taskid)
            published = state.get("published")
            if published is None:
                link, callback_data = self._result_link(taskid, state)
                published = {"resultLink": link, "callbackData": callback_data}
                # the link is all finalize needs: the result and its inputs go
                _clear(task_dir)
                _write_json(task_dir / "state.json", {"published": published})
        self.report(
            taskid,
            R.RESULT_UPLOADED,
            result_link=published["resultLink"],
            callback_data=published["callbackData"],
        )
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
                purge_dir(state_file.parent)
        return outcomes

    def _resume_one(self, taskid: str, state: dict[str, Any]) -> JobOutcome:
        if self._abort_requested(taskid):
            return JobOutcome(taskid, "DROPPED", "aborted on the scheduler's request")
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
        """Remove orphan app containers every ``period`` seconds until ``stop``, delete the
        task folders no longer needed (:meth:`sweep`), and look at the node's gas (logged
        when it runs low or out, as iexec-worker does)."""
        while not stop.is_set():
            try:
                self.remove_orphans()
            except Exception as exc:  # Docker slow or down: try again next period
                log.warning("orphan container clean-up failed: %s", exc)
            try:
                self.sweep()
            except Exception as exc:  # the chain does not answer: next period
                log.warning("task folder clean-up failed: %s", exc)
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
