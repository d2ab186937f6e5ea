"""Worker reports: each status change a worker sends is applied to its replicate and moves
the task on (the fast path; the tick's reconcile repairs whatever a lost report left)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from pool.messages import ReplicateReport
from pool.states import ReplicateStatus, TaskStatus
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
# each stream of a worker's compute logs, at most (iexec-core's ComputeLogs.MAX_LOG_LENGTH):
# a worker's report is not trusted to have capped them
LOG_CHARS = 100_000


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
        self.retention_days = ctx.settings.logs_availability_days
        self.planner = planner
        self.fleet = fleet
        self.consensus = consensus
        self.finalizer = finalizer

    def apply(self, report: ReplicateReport) -> None:
        taskid, worker, target = report.taskid, report.worker, report.status
        doc = self.store.advance_replicate(
            taskid,
            worker,
            target,
            tx_hash=report.tx_hash,
            note=report.reason or report.note,
            cause=report.cause,
            extra=stored_fields(report),
            # REVEALED after RESULT_UPLOADING means "upload failed" only when it says so; a
            # late or repeated reveal report (a resumed node) must not undo the upload
            stale_from=_UPLOADING
            if target == R.REVEALED and not report.upload_failed
            else frozenset(),
        )
        if doc is None:
            log.info("stale or unknown report %s from %s on %s", target, worker, taskid)
            return
        if report.stdout or report.stderr:
            self.keep_compute_logs(report)
        if target == R.CONTRIBUTED:
            self.fleet.succeeded(worker)
            task = self.store.task(taskid) or {}
            if task.get("status") in _REVEAL_PHASE:
                self.consensus.request_reveals(taskid)  # consensus came with another one
            elif not self.consensus.check(taskid):
                self.planner.replan(taskid)
        elif target == R.REVEALED:
            task = self.store.task(taskid) or {}
            if (
                report.upload_failed
                and task.get("status") == str(T.RESULT_UPLOADING)
                and task.get("uploader") == worker.lower()
            ):
                self.finalizer.upload_failed(taskid, worker.lower(), report.reason or "failed")
            else:
                self.consensus.revealed(taskid)
        elif target == R.RESULT_UPLOADED:
            if not report.result_link:
                log.error("RESULT_UPLOADED for %s without a result link", taskid)
                return
            self.finalizer.uploaded(taskid, report.result_link, report.callback_data or "")
        elif target == R.COMPLETED and report.finalized:
            self.finalizer.finalized_by_worker(
                taskid, worker, report.result_link or "", report.callback_data or ""
            )
        elif target == R.ABORTED and report.node_fault:
            # the node's own failure (engine, registry seen from it, disk): another node may
            # well succeed, and this one is paused after repeated ones
            log.warning(
                "replicate of %s on %s failed on the node's side: %s", worker, taskid, report.reason
            )
            self.fleet.failed(worker)
            self.planner.replan(
                taskid, why=f"{worker} failed on its side: {report.reason or report.cause}"
            )
        elif str(target) in REPLICATE_DEAD:
            log.warning(
                "replicate of %s on %s: %s (%s)", worker, taskid, target, report.reason or ""
            )

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


def stored_fields(report: ReplicateReport) -> dict[str, Any]:
    """What a report adds to its replicate's document, under the store's field names."""
    fields = {
        "reason": report.reason,
        "logTail": report.log_tail,
        "resultDigest": report.result_digest,
        "resultLink": report.result_link,
        "callbackData": report.callback_data,
        "exitCode": report.exit_code,
        "duration": report.duration,
    }
    return {k: v for k, v in fields.items() if v is not None}
