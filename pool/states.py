"""Deal, worker, task and replicate statuses (iexec-core naming) and the transitions allowed
between them.

The store checks every status write against these tables atomically (a conditional update on
the current status), so two processes racing on one task cannot take it through a transition
that is not listed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any


class DealStatus(StrEnum):
    ACCEPTED = "ACCEPTED"  # the pool serves it: its tasks are stored
    SKIPPED = "SKIPPED"  # stored with a reason (category, tag, deadline), never run
    # its SchedulerNotice vanished in a chain reorganisation before anything was sent for it:
    # its tasks are deleted; it is taken again if the chain shows it again
    REORGED = "REORGED"


class WorkerStatus(StrEnum):
    """A worker node as the pool sees it. The scheduler stores ALIVE (a heartbeat came) and
    LOST (silent for WORKER_LOST_TIMEOUT); PAUSED is derived on reading, while the scheduler
    refuses the node work after repeated failures (its ``pausedUntil``)."""

    ALIVE = "ALIVE"
    LOST = "LOST"
    PAUSED = "PAUSED"


class TaskStatus(StrEnum):
    RECEIVED = "RECEIVED"
    INITIALIZING = "INITIALIZING"
    INITIALIZED = "INITIALIZED"
    RUNNING = "RUNNING"
    CONSENSUS_REACHED = "CONSENSUS_REACHED"
    AT_LEAST_ONE_REVEALED = "AT_LEAST_ONE_REVEALED"
    RESULT_UPLOADING = "RESULT_UPLOADING"
    RESULT_UPLOADED = "RESULT_UPLOADED"
    FINALIZING = "FINALIZING"
    FINALIZED = "FINALIZED"
    COMPLETED = "COMPLETED"
    # failure side
    INITIALIZE_FAILED = "INITIALIZE_FAILED"
    CONTRIBUTION_TIMEOUT = "CONTRIBUTION_TIMEOUT"
    REOPENING = "REOPENING"
    REOPENED = "REOPENED"
    FINAL_DEADLINE_REACHED = "FINAL_DEADLINE_REACHED"
    FINALIZE_FAILED = "FINALIZE_FAILED"
    FAILED = "FAILED"


class ReplicateStatus(StrEnum):
    CREATED = "CREATED"
    STARTING = "STARTING"
    START_FAILED = "START_FAILED"  # refused before anything ran (iexec-worker v9's check)
    APP_DOWNLOADING = "APP_DOWNLOADING"
    COMPUTING = "COMPUTING"
    COMPUTED = "COMPUTED"
    CONTRIBUTING = "CONTRIBUTING"
    CONTRIBUTED = "CONTRIBUTED"
    REVEALING = "REVEALING"
    REVEALED = "REVEALED"
    RESULT_UPLOADING = "RESULT_UPLOADING"
    RESULT_UPLOADED = "RESULT_UPLOADED"
    COMPLETED = "COMPLETED"
    # failure side
    APP_DOWNLOAD_FAILED = "APP_DOWNLOAD_FAILED"
    DATA_DOWNLOAD_FAILED = "DATA_DOWNLOAD_FAILED"
    COMPUTE_FAILED = "COMPUTE_FAILED"
    CONTRIBUTE_FAILED = "CONTRIBUTE_FAILED"
    REVEAL_FAILED = "REVEAL_FAILED"
    WORKER_LOST = "WORKER_LOST"
    ABORTED = "ABORTED"


class ReplicateStatusCause(StrEnum):
    """Why a replicate changed status, in iexec-common's ``ReplicateStatusCause`` names (the
    ones this pool emits): iExec clients read them from the task routes and refuse a name
    outside that enum."""

    TASK_DESCRIPTION_INVALID = "TASK_DESCRIPTION_INVALID"  # a request the pool refuses
    TASK_NOT_ACTIVE = "TASK_NOT_ACTIVE"
    CHAIN_RECEIPT_NOT_VALID = "CHAIN_RECEIPT_NOT_VALID"
    CONSENSUS_REACHED = "CONSENSUS_REACHED"
    CONTRIBUTION_TIMEOUT = "CONTRIBUTION_TIMEOUT"
    APP_IMAGE_DOWNLOAD_FAILED = "APP_IMAGE_DOWNLOAD_FAILED"
    INPUT_FILES_DOWNLOAD_FAILED = "INPUT_FILES_DOWNLOAD_FAILED"
    DATASET_FILE_DOWNLOAD_FAILED = "DATASET_FILE_DOWNLOAD_FAILED"
    DATASET_FILE_BAD_CHECKSUM = "DATASET_FILE_BAD_CHECKSUM"
    APP_NOT_FOUND_LOCALLY = "APP_NOT_FOUND_LOCALLY"
    APP_COMPUTE_FAILED = "APP_COMPUTE_FAILED"
    APP_COMPUTE_TIMEOUT = "APP_COMPUTE_TIMEOUT"
    POST_COMPUTE_COMPUTED_FILE_NOT_FOUND = "POST_COMPUTE_COMPUTED_FILE_NOT_FOUND"
    POST_COMPUTE_RESULT_FILE_NOT_FOUND = "POST_COMPUTE_RESULT_FILE_NOT_FOUND"
    POST_COMPUTE_RESULT_DIGEST_COMPUTATION_FAILED = "POST_COMPUTE_RESULT_DIGEST_COMPUTATION_FAILED"
    POST_COMPUTE_OUT_FOLDER_ZIP_FAILED = "POST_COMPUTE_OUT_FOLDER_ZIP_FAILED"
    POST_COMPUTE_TOO_LONG_RESULT_FILE_NAME = "POST_COMPUTE_TOO_LONG_RESULT_FILE_NAME"
    POST_COMPUTE_FAILED_UNKNOWN_ISSUE = "POST_COMPUTE_FAILED_UNKNOWN_ISSUE"
    CHAIN_UNREACHABLE = "CHAIN_UNREACHABLE"
    DETERMINISM_HASH_NOT_FOUND = "DETERMINISM_HASH_NOT_FOUND"
    RESULT_LINK_MISSING = "RESULT_LINK_MISSING"
    REVEAL_TIMEOUT = "REVEAL_TIMEOUT"
    CANNOT_REVEAL = "CANNOT_REVEAL"
    ABORTED_BY_WORKER = "ABORTED_BY_WORKER"
    UNKNOWN = "UNKNOWN"


T = TaskStatus
_DEADLINE = {T.FINAL_DEADLINE_REACHED}

TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    T.RECEIVED: frozenset({T.INITIALIZING, T.INITIALIZED, T.INITIALIZE_FAILED, *_DEADLINE}),
    # INITIALIZING -> RECEIVED: a batch interrupted before it was sent goes back to the pool
    T.INITIALIZING: frozenset({T.INITIALIZED, T.INITIALIZE_FAILED, T.RECEIVED, *_DEADLINE}),
    # -> FINALIZED: a trust-1 worker's contributeAndFinalize did it all in one transaction
    T.INITIALIZED: frozenset(
        {T.RUNNING, T.CONSENSUS_REACHED, T.FINALIZED, T.CONTRIBUTION_TIMEOUT, *_DEADLINE}
    ),
    T.RUNNING: frozenset({T.CONSENSUS_REACHED, T.FINALIZED, T.CONTRIBUTION_TIMEOUT, *_DEADLINE}),
    T.CONSENSUS_REACHED: frozenset({T.AT_LEAST_ONE_REVEALED, T.REOPENING, *_DEADLINE}),
    # -> RESULT_UPLOADED: the uploader's report came after its upload was given up as timed out
    T.AT_LEAST_ONE_REVEALED: frozenset(
        {T.RESULT_UPLOADING, T.RESULT_UPLOADED, T.FINALIZING, *_DEADLINE}
    ),
    # RESULT_UPLOADING -> AT_LEAST_ONE_REVEALED: the uploader failed, ask another winner
    T.RESULT_UPLOADING: frozenset({T.RESULT_UPLOADED, T.AT_LEAST_ONE_REVEALED, *_DEADLINE}),
    T.RESULT_UPLOADED: frozenset({T.FINALIZING, *_DEADLINE}),
    T.FINALIZING: frozenset({T.FINALIZED, T.FINALIZE_FAILED, *_DEADLINE}),
    T.FINALIZED: frozenset({T.COMPLETED}),
    T.FINALIZE_FAILED: frozenset({T.FINALIZING, T.FINALIZED, *_DEADLINE}),
    T.REOPENING: frozenset({T.REOPENED, T.CONSENSUS_REACHED, *_DEADLINE}),
    T.REOPENED: frozenset({T.RUNNING, T.CONSENSUS_REACHED, T.FINALIZED, *_DEADLINE}),
    T.CONTRIBUTION_TIMEOUT: frozenset({T.FAILED, *_DEADLINE}),
    T.INITIALIZE_FAILED: frozenset({T.FAILED}),
    # the chain is the judge after the final deadline: claimed (FAILED) or finalized in time
    T.FINAL_DEADLINE_REACHED: frozenset({T.FAILED, T.COMPLETED}),
    T.COMPLETED: frozenset(),
    T.FAILED: frozenset(),
}

R = ReplicateStatus
_R_ABORT = {R.WORKER_LOST, R.ABORTED}
# a failure of the app or of the requester's inputs is followed by the contribution of an
# error result (iexec-worker v9: APP_DOWNLOAD_FAILED / DATA_DOWNLOAD_FAILED -> CONTRIBUTING;
# this pool does the same after COMPUTE_FAILED: an app that left no usable result)
_ERROR_RESULT = {R.CONTRIBUTING, *_R_ABORT}
REPLICATE_TRANSITIONS: dict[ReplicateStatus, frozenset[ReplicateStatus]] = {
    R.CREATED: frozenset({R.STARTING, *_R_ABORT}),
    R.STARTING: frozenset({R.APP_DOWNLOADING, R.START_FAILED, *_R_ABORT}),
    R.APP_DOWNLOADING: frozenset(
        {R.COMPUTING, R.APP_DOWNLOAD_FAILED, R.DATA_DOWNLOAD_FAILED, *_R_ABORT}
    ),
    R.COMPUTING: frozenset({R.COMPUTED, R.COMPUTE_FAILED, *_R_ABORT}),
    R.COMPUTED: frozenset({R.CONTRIBUTING, *_R_ABORT}),
    R.CONTRIBUTING: frozenset({R.CONTRIBUTED, R.CONTRIBUTE_FAILED, *_R_ABORT}),
    R.CONTRIBUTED: frozenset({R.REVEALING, R.COMPLETED, *_R_ABORT}),
    R.REVEALING: frozenset({R.REVEALED, R.REVEAL_FAILED, *_R_ABORT}),
    R.REVEALED: frozenset({R.RESULT_UPLOADING, R.COMPLETED, *_R_ABORT}),
    R.RESULT_UPLOADING: frozenset({R.RESULT_UPLOADED, R.REVEALED, *_R_ABORT}),
    R.RESULT_UPLOADED: frozenset({R.COMPLETED}),
    R.COMPLETED: frozenset(),
    R.START_FAILED: frozenset(),
    R.APP_DOWNLOAD_FAILED: frozenset(_ERROR_RESULT),
    R.DATA_DOWNLOAD_FAILED: frozenset(_ERROR_RESULT),
    R.COMPUTE_FAILED: frozenset(_ERROR_RESULT),
    R.CONTRIBUTE_FAILED: frozenset(),
    R.REVEAL_FAILED: frozenset(),
    # it came back (or said it aborted)
    R.WORKER_LOST: frozenset({R.STARTING, R.CONTRIBUTED, R.REVEALED, R.ABORTED}),
    R.ABORTED: frozenset(),
}

FINAL_TASK_STATUSES = frozenset(s for s, nxt in TASK_TRANSITIONS.items() if not nxt)
FINAL_REPLICATE_STATUSES = frozenset(s for s, nxt in REPLICATE_TRANSITIONS.items() if not nxt)


def predecessors(table: Mapping[Any, frozenset[Any]], target: object) -> list[str]:
    """Statuses from which ``target`` may be reached, as stored strings."""
    return [str(src) for src, nxt in table.items() if target in nxt]


class InvalidTransition(ValueError):
    """A status change the tables above do not allow."""


# the failures a worker reports only once the error result it contributes next is ready
# (iexec-worker v9 does so for APP_IMAGE_DOWNLOAD_FAILED, DATASET_FILE_DOWNLOAD_FAILED,
# DATASET_FILE_BAD_CHECKSUM and INPUT_FILES_DOWNLOAD_FAILED; this pool also after
# COMPUTE_FAILED: an app that left no usable result, docs/operations.md)
ERROR_RESULT_STATUSES = frozenset({R.APP_DOWNLOAD_FAILED, R.DATA_DOWNLOAD_FAILED, R.COMPUTE_FAILED})

REPLICATE_FAILURES = frozenset(
    {
        R.START_FAILED,
        R.APP_DOWNLOAD_FAILED,
        R.DATA_DOWNLOAD_FAILED,
        R.COMPUTE_FAILED,
        R.CONTRIBUTE_FAILED,
        R.REVEAL_FAILED,
        R.WORKER_LOST,
        R.ABORTED,
    }
)


def path_to(
    table: Mapping[Any, frozenset[Any]],
    current: Any,
    target: Any,
    avoid: frozenset[Any] = REPLICATE_FAILURES,
) -> list[Any] | None:
    """Shortest chain of allowed transitions from ``current`` to ``target`` (excluding
    ``current``), or None when ``target`` cannot be reached. Used to apply status reports that
    arrive out of order: a worker's COMPUTED may be processed before its COMPUTING."""
    if current == target:
        return []
    frontier: list[list[Any]] = [[current]]
    seen = {current}
    while frontier:
        path = frontier.pop(0)
        for nxt in sorted(table.get(path[-1], ()), key=str):
            if nxt in seen or (nxt in avoid and nxt != target):
                continue
            if nxt == target:
                return [*path[1:], nxt]
            seen.add(nxt)
            frontier.append([*path, nxt])
    return None
