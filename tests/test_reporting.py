"""A node's progress reports are held a moment and go with the next report of the same
replicate (workers/reporting.py): a fast task costs two messages instead of six, a long
stage is still seen, and the reports of one replicate keep their order. No broker: the
reporter's ``send`` is a list."""

from __future__ import annotations

import threading
import time

import pytest

from pool.messages import ReplicateReport
from pool.states import ReplicateStatus
from workers.reporting import Reporter

R = ReplicateStatus
WORKER = "0x" + "aa" * 20
TASK = "0x" + "0a" * 32
OTHER = "0x" + "0b" * 32


class Sent:
    def __init__(self, failures: int = 0) -> None:
        self.reports: list[ReplicateReport] = []
        self.failures = failures
        self.arrived = threading.Condition()

    def __call__(self, report: ReplicateReport) -> None:
        with self.arrived:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("broker away")
            self.reports.append(report)
            self.arrived.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.reports) >= count, timeout), self.reports


def rep(status: ReplicateStatus, taskid: str = TASK, **fields: object) -> ReplicateReport:
    return ReplicateReport(taskid, WORKER, status, **fields)  # type: ignore[arg-type]


def test_a_fast_task_s_progress_goes_with_the_report_that_follows_it() -> None:
    sent = Sent()
    reporter = Reporter(sent, hold=60)
    before = time.time()
    for status in (R.STARTING, R.APP_DOWNLOADING, R.COMPUTING):
        reporter.report(rep(status))
    assert sent.reports == []  # held
    reporter.report(rep(R.COMPUTED, exit_code=0))
    (computed,) = sent.reports
    assert computed.status == R.COMPUTED and computed.exit_code == 0
    assert computed.passed == (R.STARTING, R.APP_DOWNLOADING, R.COMPUTING)
    assert before <= computed.passed_at[0] <= computed.passed_at[1] <= computed.passed_at[2]
    # the control process's side: CONTRIBUTING goes with COMPLETED
    reporter.report(rep(R.CONTRIBUTING))
    reporter.report(rep(R.COMPLETED, finalized=True))
    assert [(r.passed, r.status) for r in sent.reports[1:]] == [((R.CONTRIBUTING,), R.COMPLETED)]


def test_a_long_stage_is_reported_alone_once_the_hold_is_over() -> None:
    sent = Sent()
    reporter = Reporter(sent, hold=0.05)
    reporter.report(rep(R.STARTING))
    reporter.report(rep(R.APP_DOWNLOADING))  # (a long image pull follows)
    sent.wait_for(1)
    (downloading,) = sent.reports
    assert downloading.status == R.APP_DOWNLOADING and downloading.passed == (R.STARTING,)
    # and what follows carries nothing sent already
    reporter.report(rep(R.COMPUTING))
    sent.wait_for(2)
    assert (sent.reports[1].status, sent.reports[1].passed) == (R.COMPUTING, ())


def test_a_report_that_says_more_than_its_status_is_never_held_and_tasks_do_not_mix() -> None:
    sent = Sent()
    reporter = Reporter(sent, hold=60)
    reporter.report(rep(R.STARTING, OTHER))
    reporter.report(rep(R.CONTRIBUTING, note="a note"))  # says something: sent at once
    reporter.report(rep(R.STARTING))
    reporter.report(rep(R.ABORTED, reason="engine down", node_fault=True))
    assert [(r.taskid, r.status, r.passed) for r in sent.reports] == [
        (TASK, R.CONTRIBUTING, ()),
        (TASK, R.ABORTED, (R.STARTING,)),
    ]
    reporter.flush()  # the node stops: the other task's progress leaves
    assert (sent.reports[-1].taskid, sent.reports[-1].status) == (OTHER, R.STARTING)


def test_a_held_report_the_broker_did_not_take_goes_with_the_next_try() -> None:
    sent = Sent(failures=1)
    reporter = Reporter(sent, hold=0.05)
    reporter.report(rep(R.STARTING))
    sent.wait_for(1)  # the first try failed, the second one went
    assert [(r.status, r.passed) for r in sent.reports] == [(R.STARTING, ())]


def test_without_a_hold_every_report_leaves_at_once() -> None:
    sent = Sent()
    reporter = Reporter(sent, hold=0)
    reporter.report(rep(R.STARTING))
    assert [r.status for r in sent.reports] == [R.STARTING]


@pytest.mark.parametrize("status", [R.COMPUTED, R.CONTRIBUTED, R.REVEALED, R.COMPUTE_FAILED])
def test_what_ends_a_stage_is_never_held(status: ReplicateStatus) -> None:
    sent = Sent()
    Reporter(sent, hold=60).report(rep(status))
    assert [r.status for r in sent.reports] == [status]


def test_a_report_the_broker_refuses_keeps_the_progress_held_before_it() -> None:
    sent = Sent(failures=1)
    reporter = Reporter(sent, hold=60)
    reporter.report(rep(R.COMPUTING))
    with pytest.raises(ConnectionError):
        reporter.report(rep(R.COMPUTED, exit_code=0))
    reporter.report(rep(R.COMPUTED, exit_code=0))  # the node's next try
    assert [(r.passed, r.status) for r in sent.reports] == [((R.COMPUTING,), R.COMPUTED)]
