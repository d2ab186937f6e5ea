"""How a worker node sends its replicate reports: a progress status held a moment, so that
a fast stage costs no message of its own.

A replicate goes through progress statuses (STARTING, APP_DOWNLOADING, COMPUTING,
CONTRIBUTING) that a fast task leaves within a fraction of a second. Each one sent alone costs
a signed message, a Redis round trip on the task's path (100 ms over a slow link) and a
write in the scheduler. Here a progress report that says nothing but its status is held for
:data:`HOLD` seconds: the next report of the same replicate within that time carries it (its
status and time, ``passed``) and the scheduler records both in one write; otherwise it is sent
alone when the time is up, so that a long stage (an image pull, a long computation) is seen
within :data:`HOLD` seconds as before. The reports of one replicate keep their order.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from pool.messages import ReplicateReport
from pool.states import ReplicateStatus

log = logging.getLogger(__name__)

R = ReplicateStatus

# the statuses a replicate only passes through on its way to a report that follows them in
# the same process (the compute process: up to COMPUTED; the control process: CONTRIBUTING
# to CONTRIBUTED or COMPLETED)
PROGRESS = frozenset({R.STARTING, R.APP_DOWNLOADING, R.COMPUTING, R.CONTRIBUTING})
HOLD = 1.0  # seconds a progress report waits for the next one before it is sent alone


@dataclasses.dataclass
class _Held:
    reports: list[tuple[ReplicateReport, float]]  # with their times, oldest first
    due: float  # monotonic time the last one is sent alone


class Reporter:
    """Sends ``send(report)`` for each report, holding progress reports as described above.
    ``hold`` 0 sends every report at once."""

    def __init__(self, send: Callable[[ReplicateReport], None], hold: float = HOLD) -> None:
        self._send = send
        self.hold = hold
        self._held: dict[str, _Held] = {}  # taskid -> its held progress reports
        self._lock = threading.Lock()  # held reports, and the order of one task's reports
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def report(self, report: ReplicateReport) -> None:
        holdable = (
            self.hold > 0
            and report.status in PROGRESS
            and report == ReplicateReport(report.taskid, report.worker, report.status)
        )
        with self._lock:
            held = self._held.pop(report.taskid, None)
            before = held.reports if held else []
            if holdable:
                due = held.due if held else time.monotonic() + self.hold
                self._held[report.taskid] = _Held([*before, (report, time.time())], due)
                self._start()
                self._wake.notify()
                return
            try:
                self._send(_carrying(report, before))
            except Exception:  # the caller hears of it; the held progress waits for the next
                if held is not None:
                    self._held[report.taskid] = held
                raise

    def flush(self) -> None:
        """Send every held report now (the node stops)."""
        with self._lock:
            for taskid in list(self._held):
                self._send_held(taskid)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="reports")
            self._thread.start()

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for taskid, held in list(self._held.items()):
                    if held.due <= now:
                        self._send_held(taskid)
                if not self._held:
                    self._wake.wait(60)
                    if not self._held:
                        self._thread = None  # (a new one starts with the next held report)
                        return
                    continue
                self._wake.wait(min(h.due for h in self._held.values()) - now)

    def _send_held(self, taskid: str) -> None:
        """Send the last report held for ``taskid``, carrying those held before it (the lock
        held). Not sent (the broker away): kept for the next report, or the next try."""
        held = self._held.pop(taskid)
        *before, (last, _) = held.reports
        try:
            self._send(_carrying(last, before))
        except Exception as exc:
            log.warning("task %s: progress report %s not sent yet: %s", taskid, last.status, exc)
            self._held[taskid] = _Held(held.reports, time.monotonic() + self.hold)


def _carrying(
    report: ReplicateReport, before: list[tuple[ReplicateReport, float]]
) -> ReplicateReport:
    """``report`` with the progress statuses held before it (those it went through)."""
    first: dict[ReplicateStatus, float] = {}
    for held, at in before:
        first.setdefault(held.status, at)
    passed = [(status, at) for status, at in first.items() if status != report.status]
    if not passed:
        return report
    return dataclasses.replace(
        report,
        passed=tuple(status for status, _ in passed),
        passed_at=tuple(at for _, at in passed),
    )
