"""Worker reports: each status change a worker sends is applied to its replicate and moves
the task on (the fast path; the tick's reconcile repairs whatever a lost report left).

A report is a claim of the worker that signed it (:mod:`scheduler.inbox` proved who that is),
about its own replicate only. A claim that moves money or results is checked before it is
applied, and a report never implies a status it did not prove: every checked status on the
way from where the replicate is to where the report takes it is checked (:meth:`Reports.
_check`):

* CONTRIBUTED: the worker is among the task's contributors on chain (``viewTask``, the
  read the consensus check then uses);
* REVEALED: its contribution is PROVED on chain (``viewContribution``);
* RESULT_UPLOADING, RESULT_UPLOADED: the scheduler asked this worker to upload the result
  (the task is RESULT_UPLOADING, or back to AT_LEAST_ONE_REVEALED when the upload was given
  up as timed out before the report came); RESULT_UPLOADED also needs a result link;
* COMPLETED: the worker finalized (``contributeAndFinalize``), the chain says the task is
  COMPLETED and the worker contributed to it; the result link recorded is the chain's.

The other statuses (STARTING ... COMPUTED, CONTRIBUTING, REVEALING, the failures) only say
how the worker's own replicate goes, as upstream iexec-core takes them; a replicate given up
with its worker (WORKER_LOST) moves again only once the worker is ALIVE again (a verified
heartbeat). When the chain does not show a claim yet (a node behind), or the heartbeat of a
lost worker has not come yet, :class:`NotYet` is raised and the receiver asks again later; a
claim never confirmed is refused.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from poco.results import callback_bytes, parse_result_link
from poco.types import ChainTaskStatus, ContributionStatus, Task
from pool.clock import from_unix
from pool.messages import (
    BAD_RESULT_LINK,
    BAD_STATUS,
    LOST_WORKER,
    NOT_ON_CHAIN,
    NOT_UPLOADER,
    UNKNOWN_REPLICATE,
    Refused,
    ReplicateReport,
)
from pool.redact import redact_urls
from pool.states import (
    REPLICATE_TRANSITIONS,
    ReplicateStatus,
    TaskStatus,
    WorkerStatus,
    may_stand_for_a_failure,
)
from scheduler.consensus import Consensus
from scheduler.context import REPLICATE_DEAD, REVEAL_PHASE, SchedulerContext
from scheduler.finalize import Finalizer
from scheduler.fleet import Fleet
from scheduler.planning import Planner

log = logging.getLogger(__name__)

R = ReplicateStatus
T = TaskStatus

_REVEAL_PHASE = frozenset(str(s) for s in REVEAL_PHASE)
_UPLOADING = frozenset({str(R.RESULT_UPLOADING)})
_UPLOAD = (R.RESULT_UPLOADING, R.RESULT_UPLOADED)
MAX_LINK = 4096  # characters of a result link
MAX_CALLBACK = 2 * 64 * 1024 + 2  # 0x + hex of 64 KiB
MAX_REASON = 2000
# each stream of a worker's compute logs, at most (iexec-core's ComputeLogs.MAX_LOG_LENGTH):
# a worker's report is not trusted to have capped them
LOG_CHARS = 100_000


class NotYet(Exception):
    """What a report claims is not confirmed (yet): ask again later, then refuse it for
    ``reason``."""

    def __init__(self, detail: str, reason: str = NOT_ON_CHAIN) -> None:
        super().__init__(detail)
        self.reason = reason


class Reports:
    def __init__(
        self,
        ctx: SchedulerContext,
        planner: Planner,
        fleet: Fleet,
        consensus: Consensus,
        finalizer: Finalizer,
    ) -> None:
        self.store = ctx.store
        self.client = ctx.client
        self.retention_days = ctx.settings.logs_availability_days
        self.planner = planner
        self.fleet = fleet
        self.consensus = consensus
        self.finalizer = finalizer

    def apply(self, report: ReplicateReport, *, first_try: bool = False) -> None:
        """Apply ``report`` of ``report.worker`` (the proven signer). Raises :class:`Refused`
        for a claim that is not the worker's to make, :class:`NotYet` for one the chain
        does not show, and on its ``first_try`` for a report that skips statuses one of
        which may have been a failure (its report, sent first, is on its way: the error
        result's failure and cause must not be replaced by an implied success)."""
        taskid, worker, target = report.taskid, report.worker.lower(), report.status
        if target == R.COMPLETED and not report.finalized:
            raise Refused(BAD_STATUS, "COMPLETED is the scheduler's to set", worker)
        chain: dict[str, Any] = {}  # what the checks read, for what follows
        check_chain = self._check(report, chain)
        walked: list[ReplicateStatus] = []  # the statuses the report moves the replicate through

        def check(current: dict[str, Any], path: list[ReplicateStatus]) -> None:
            walked[:] = path
            if (
                first_try
                and not set(path[:-1]) <= set(report.passed)  # (the worker's own account)
                and may_stand_for_a_failure(
                    REPLICATE_TRANSITIONS, ReplicateStatus(current["status"]), target
                )
            ):
                raise NotYet(
                    f"{target} skips {', '.join(map(str, path[:-1]))}: waiting once for the "
                    "report sent before it"
                )
            check_chain(current, path)

        doc = self.store.advance_replicate(
            taskid,
            worker,
            target,
            tx_hash=report.tx_hash,
            note=_short(report.reason or report.note),
            cause=report.cause,
            extra=stored_fields(report),
            # REVEALED after RESULT_UPLOADING means "upload failed" only when it says so; a
            # late or repeated reveal report (a resumed node) must not undo the upload
            stale_from=_UPLOADING
            if target == R.REVEALED and not report.upload_failed
            else frozenset(),
            check=check,
            passed={
                status: from_unix(at)
                for status, at in zip(report.passed, report.passed_at, strict=True)
            },
        )
        if doc is None:
            if self.store.replicate(taskid, worker) is None:
                raise Refused(UNKNOWN_REPLICATE, f"no replicate of task {taskid}", worker)
            log.info("stale report %s from %s on %s", target, worker, taskid)
            return
        if report.stdout or report.stderr:
            self.keep_compute_logs(report)
        # a later report applied first walks the replicate past CONTRIBUTED (a node asked to
        # reveal by someone else than the scheduler, reports taken out of order): what the
        # contribution means for the task is done all the same (COMPLETED: finalized at once)
        if target == R.CONTRIBUTED or (R.CONTRIBUTED in walked and target != R.COMPLETED):
            self.contributed(taskid, worker, chain.get("task"))
        if target == R.CONTRIBUTING:
            # its CONTRIBUTED (or COMPLETED) report should follow: the tick looks again until
            # it does, and past its grace asks the chain (the report may be lost)
            self.store.mark_for_review(taskid)
        elif target == R.REVEALED:
            task = self.store.task(taskid) or {}
            if task.get("status") == str(T.RESULT_UPLOADED):
                # the result waits for this winner's reveal to be finalized: the tick does it
                self.store.mark_for_review(taskid)
            if (
                report.upload_failed
                and task.get("status") == str(T.RESULT_UPLOADING)
                and task.get("uploader") == worker
            ):
                reason = _short(report.reason) or "failed"
                self.finalizer.upload_failed(taskid, worker, reason)
            else:
                self.consensus.revealed(taskid)
        elif target == R.RESULT_UPLOADED:
            self.finalizer.uploaded(
                taskid, worker, report.result_link or "", report.callback_data or ""
            )
        elif target == R.COMPLETED:
            self.finalizer.finalized_by_worker(taskid, worker, chain["task"])
        elif target == R.ABORTED and report.node_fault:
            # the node's own failure (engine, registry seen from it, disk): another node may
            # well succeed, and this one is paused after repeated ones
            log.warning(
                "replicate of %s on %s failed on the node's side: %s",
                worker,
                taskid,
                _short(report.reason),
            )
            self.fleet.failed(worker)
            self.planner.replan(
                taskid, why=f"{worker} failed on its side: {_short(report.reason) or report.cause}"
            )
        elif str(target) in REPLICATE_DEAD:
            log.warning(
                "replicate of %s on %s: %s (%s)", worker, taskid, target, _short(report.reason)
            )
            self.store.mark_for_review(taskid)  # another replicate may be needed

    def contributed(self, taskid: str, worker: str, chain: Task | None) -> None:
        """``worker`` contributed to ``taskid`` (``chain``: the viewTask its check read)."""
        self.fleet.succeeded(worker)
        task = self.store.task(taskid) or {}
        if task.get("status") in _REVEAL_PHASE:
            # consensus came with another one
            self.consensus.request_reveals(taskid, chain)
        elif not self.consensus.check(taskid, chain):
            self.planner.replan(taskid)

    def keep_compute_logs(self, report: ReplicateReport) -> None:
        """The app's stdout and stderr of a COMPUTED or COMPUTE_FAILED report go to the
        requester's logs (apart from the replicate, as iexec-core keeps them), until
        IEXEC_LOGS_AVAILABILITY_PERIOD_IN_DAYS after the task's final deadline."""
        if report.status not in (R.COMPUTED, R.COMPUTE_FAILED):
            return
        task = self.store.task(report.taskid) or {}
        deadline = task.get("finalDeadline")
        if not isinstance(deadline, int):
            return
        days = self.retention_days
        expires = dt.datetime.fromtimestamp(deadline, dt.UTC).replace(tzinfo=None)
        stored = self.store.add_compute_logs(
            report.taskid,
            report.worker,
            (report.stdout or "")[-LOG_CHARS:],
            (report.stderr or "")[-LOG_CHARS:],
            expires + dt.timedelta(days=days),
        )
        if stored:
            self.store.set_replicate_fields(
                report.taskid, report.worker, {"appComputeLogsPresent": True}
            )

    def _check(
        self, report: ReplicateReport, chain: dict[str, Any]
    ) -> Callable[[dict[str, Any], list[ReplicateStatus]], None]:
        """The check of the statuses a report walks its replicate through (see the module's
        list); what it reads of the chain is left in ``chain`` (``task``, a viewTask)."""
        taskid, worker = report.taskid, report.worker.lower()

        def check(current: dict[str, Any], path: list[ReplicateStatus]) -> None:
            if path and current["status"] == str(R.WORKER_LOST):
                record = self.store.worker(worker) or {}
                if record.get("status") != str(WorkerStatus.ALIVE):
                    raise NotYet(f"{worker} is {record.get('status')}: no heartbeat", LOST_WORKER)
            repeat = not path  # the replicate is there already: its side effects run again
            steps = set(path or [report.status])
            if steps & set(_UPLOAD):
                task = self.store.task(taskid) or {}
                # AT_LEAST_ONE_REVEALED: the asked uploader's report came after the scheduler
                # gave its upload up as timed out; the link is still the one it asked for
                asked = task.get("status") in (
                    str(T.RESULT_UPLOADING),
                    str(T.AT_LEAST_ONE_REVEALED),
                )
                if task.get("uploader") != worker or not (asked or repeat):
                    raise Refused(
                        NOT_UPLOADER,
                        f"task {taskid} is {task.get('status')}, its uploader "
                        f"{task.get('uploader') or 'nobody'}",
                        worker,
                    )
            if R.RESULT_UPLOADED in steps:
                problem = _link_problem(report)
                if problem:
                    raise Refused(BAD_RESULT_LINK, problem, worker)
            if R.COMPLETED in steps:
                # contributeAndFinalize: contributed, revealed and finalized at once
                view = self._task(taskid, chain)
                if view.status != ChainTaskStatus.COMPLETED or not _among(worker, view):
                    raise NotYet(
                        f"task {taskid} is {view.status.name} on chain"
                        + ("" if _among(worker, view) else f", {worker} not a contributor")
                    )
            elif R.REVEALED in steps:
                contribution = self.client.view_contribution(taskid, worker)
                if contribution.status != ContributionStatus.PROVED:
                    raise NotYet(
                        f"{worker}'s contribution to {taskid} is {contribution.status.name}"
                    )
            elif R.CONTRIBUTED in steps:
                view = self._task(taskid, chain)
                if not _among(worker, view):
                    raise NotYet(f"{worker} is not a contributor of {taskid} on chain")

        return check

    def _task(self, taskid: str, chain: dict[str, Any]) -> Task:
        if "task" not in chain:
            chain["task"] = self.client.view_task(taskid)
        task: Task = chain["task"]
        return task


def _among(worker: str, view: Task) -> bool:
    return worker in {c.lower() for c in view.contributors}


def _link_problem(report: ReplicateReport) -> str | None:
    link = report.result_link or ""
    if not link or len(link) > MAX_LINK:
        return f"a result link of 1 to {MAX_LINK} characters is needed"
    try:
        parse_result_link(link)
    except ValueError as exc:
        return str(exc)
    callback = report.callback_data or ""
    if callback:
        try:  # the parser finalize sends them with (poco.results: one for the whole pool)
            callback_bytes(callback)
        except ValueError:
            return "callback data must be hex bytes (at most 64 KiB)"
        if len(callback) > MAX_CALLBACK:
            return "callback data must be hex bytes (at most 64 KiB)"
    return None


def _short(text: str | None) -> str:
    """A worker's free text as it may be stored and shown: URLs masked, bounded."""
    return redact_urls(text or "")[:MAX_REASON]


def stored_fields(report: ReplicateReport) -> dict[str, Any]:
    """What a report adds to its replicate's document, under the store's field names (the
    result link of a COMPLETED report is the chain's, recorded on the task)."""
    fields = {
        "reason": _short(report.reason) if report.reason else None,
        "logTail": report.log_tail,
        "resultLink": report.result_link if report.status == R.RESULT_UPLOADED else None,
        "callbackData": report.callback_data if report.status == R.RESULT_UPLOADED else None,
        "exitCode": report.exit_code,
        "duration": report.duration,
    }
    return {k: v for k, v in fields.items() if v is not None}
