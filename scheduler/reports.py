"""Worker reports: each status change a worker sends is applied to its replicate and moves
the task on (the fast path; the tick's reconcile repairs whatever a lost report left)."""

from __future__ import annotations

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
        elif str(target) in REPLICATE_DEAD:
            log.warning(
                "replicate of %s on %s: %s (%s)", worker, taskid, target, report.reason or ""
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
