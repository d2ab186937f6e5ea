"""The MongoDB store: deals, tasks, replicates, workers, chain cursors, compute logs.

MongoDB is the source of truth of the scheduler. Every write here is idempotent or a
conditional update, so a crashed or duplicated scheduler never loses nor duplicates a deal:

* deals and tasks are inserted with ``$setOnInsert`` upserts keyed by unique indexes;
* a status change is one ``find_one_and_update`` filtered on the statuses allowed to lead to
  the new one (:mod:`pool.states`), which also appends to the document's ``timeline``;
* a chain cursor only moves forward (``$max``).

Only plain MongoDB operators are used, so the same code runs on mongomock in tests.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

from pool.clock import utcnow
from pool.redact import redact_urls
from pool.settings import Settings
from pool.states import (
    REPLICATE_TRANSITIONS,
    TASK_TRANSITIONS,
    DealStatus,
    InvalidTransition,
    ReplicateStatus,
    TaskStatus,
    WorkerStatus,
    path_to,
    predecessors,
)

log = logging.getLogger(__name__)

# ids per ``$in`` query when many tasks' replicates are read at once (a bounded query size)
IN_BATCH = 1000
# compute logs kept per task: the first workers' (a bounded array: at most this many
# entries of two capped streams each, far below MongoDB's 16 MB per document)
MAX_TASK_LOGS = 32
# what a worker reported that stays out of the status API's answers (a failed run's output)
PRIVATE_REPLICATE_FIELDS = ("logTail", "resultDigest", "enclave", "revealRequested")
# the due times of a task the scheduler's tick queries by (each indexed with the status): the
# deadlines on chain, the wall-clock times a step is retried at, and a mark left by a report
# (``reviewAt``)
TASK_DUE_FIELDS = (
    "contributionDeadline",
    "revealDeadline",
    "revealAskedAt",
    "uploadRequestedAt",
    "uploadFailedAt",
    "finalizeRetryAt",
    "reviewAt",
)


_MEMORY_CLIENTS: dict[str, Any] = {}


def connect(settings: Settings) -> Store:
    """Build the store named by the settings. ``mongomock://`` gives a new in-memory one;
    ``mongomock://<name>`` the in-memory one of that name in this process (several parts of
    one process, e.g. a command run in-process by a test, share it)."""
    uri = settings.mongo_uri()
    client: Any
    if uri.startswith("mongomock://"):
        import mongomock_ng as mongomock

        name = uri.removeprefix("mongomock://").strip("/")
        if not name:
            client = mongomock.MongoClient()
        else:
            client = _MEMORY_CLIENTS.setdefault(name, mongomock.MongoClient())
    else:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=False)
    store = Store(client[settings.mongo_db])
    store.ensure_indexes()
    return store


class Store:
    def __init__(self, db: Database[Any]) -> None:
        self.db = db
        self.deals: Collection[Any] = db["deals"]
        self.tasks: Collection[Any] = db["tasks"]
        self.replicates: Collection[Any] = db["replicates"]
        self.workers: Collection[Any] = db["workers"]
        self.cursors: Collection[Any] = db["cursors"]
        # the requester's compute logs, one document per task, kept apart from the replicates
        # (as iexec-core's TaskLogs) so no other read carries them
        self.task_logs: Collection[Any] = db["task_logs"]

    def ensure_indexes(self) -> None:
        self.deals.create_index("chainDealId", unique=True)
        self.tasks.create_index("chainTaskId", unique=True)
        # final deadlines within the live statuses, and the backlog to initialize read page by
        # page in the order it is initialized (earlier versions made (status, finalDeadline),
        # which this one covers)
        self.tasks.create_index([("status", 1), ("finalDeadline", 1), ("chainTaskId", 1)])
        self.tasks.create_index("chainDealId")
        # what the scheduler's tick looks at: each pass is a range on one due time within
        # the statuses it serves (:meth:`tasks_due`), so its cost follows the tasks that are
        # due, not the tasks in flight
        for due in TASK_DUE_FIELDS:
            self.tasks.create_index([("status", 1), (due, 1)])
        # the safety net's round robin over the tasks in flight, by task id
        self.tasks.create_index([("status", 1), ("chainTaskId", 1)])
        # jobs Redis may have lost: per queue, the tasks still owed jobs, oldest first
        self.tasks.create_index([("status", 1), ("queue", 1), ("enqueuedAt", 1)])
        self.replicates.create_index([("chainTaskId", 1), ("worker", 1)], unique=True)
        self.replicates.create_index("status")
        # the progress bounds: replicates in flight whose stall mark is due (a range on the
        # mark within their statuses, :meth:`replicates_due`)
        self.replicates.create_index([("status", 1), ("stallAt", 1)])
        self.replicates.create_index("worker")  # a worker's replicates (API, lost workers)
        self.workers.create_index("address", unique=True)
        self.workers.create_index([("status", 1), ("capabilities", 1)])  # who serves a queue
        self.cursors.create_index("name", unique=True)
        self.task_logs.create_index("chainTaskId", unique=True)
        # MongoDB deletes a task's logs once their retention is over (purge_compute_logs does
        # the same where no TTL monitor runs: the embedded store)
        self.task_logs.create_index("expiresAt", expireAfterSeconds=0)

    # ---- cursors ----------------------------------------------------------------------------
    def get_cursor(self, name: str) -> int | None:
        doc = self.cursors.find_one({"name": name})
        return None if doc is None else int(doc["block"])

    def advance_cursor(self, name: str, block: int) -> None:
        """Move a cursor forward to ``block`` (never backward)."""
        self.cursors.update_one(
            {"name": name},
            {"$max": {"block": block}, "$set": {"updatedAt": utcnow()}},
            upsert=True,
        )

    # ---- deals and tasks ------------------------------------------------------------------
    def save_deal(self, deal: dict[str, Any], tasks: Iterable[dict[str, Any]] = ()) -> bool:
        """Store a deal and its tasks if new; True when the deal was inserted now.

        Tasks are upserted before the deal is reported new, and each upsert is keyed by
        chainTaskId, so a crash half-way is repaired by the next call with the same deal.
        """
        now = utcnow()
        docs = []
        for task in tasks:
            doc = {**task, "createdAt": now, "updatedAt": now}
            doc.setdefault("timeline", [{"status": doc["status"], "at": now}])
            docs.append(doc)
        for start in range(0, len(docs), IN_BATCH):
            self._insert_new(self.tasks, docs[start : start + IN_BATCH])
        try:
            result = self.deals.update_one(
                {"chainDealId": deal["chainDealId"]},
                {"$setOnInsert": {**deal, "createdAt": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return result.upserted_id is not None

    @staticmethod
    def _insert_new(collection: Collection[Any], docs: list[dict[str, Any]]) -> None:
        """Insert ``docs`` in one round trip; those whose unique key is taken already (an
        earlier, interrupted call or another scheduler inserted them) are left as they are."""
        if not docs:
            return
        try:
            collection.insert_many(docs, ordered=False)
        except BulkWriteError as exc:
            others = [e for e in exc.details.get("writeErrors", []) if e.get("code") != 11000]
            if others:
                raise

    def deal(self, dealid: str) -> dict[str, Any] | None:
        return self.deals.find_one({"chainDealId": dealid}, {"_id": 0})

    def deal_location(self, dealid: str) -> dict[str, Any] | None:
        """Status, block and block hash of a stored deal (where its SchedulerNotice was)."""
        return self.deals.find_one(
            {"chainDealId": dealid},
            {"_id": 0, "chainDealId": 1, "status": 1, "blockNumber": 1, "blockHash": 1},
        )

    def drop_reorged_deal(self, dealid: str, note: str) -> bool:
        """A deal whose SchedulerNotice a chain reorganisation removed: its tasks still
        RECEIVED (nothing sent for them) are deleted and the deal becomes REORGED. False, and
        nothing changed, when any of its tasks is past RECEIVED (something was sent)."""
        received = str(TaskStatus.RECEIVED)
        if self.tasks.find_one({"chainDealId": dealid, "status": {"$ne": received}}, {"_id": 1}):
            return False
        self.tasks.delete_many({"chainDealId": dealid, "status": received})
        now = utcnow()
        result = self.deals.update_one(
            {"chainDealId": dealid, "status": {"$ne": str(DealStatus.REORGED)}},
            {
                "$set": {"status": str(DealStatus.REORGED), "updatedAt": now},
                "$push": {"timeline": {"status": str(DealStatus.REORGED), "at": now, "note": note}},
            },
        )
        return result.modified_count == 1

    def revive_deal(self, deal: dict[str, Any], tasks: Iterable[dict[str, Any]]) -> bool:
        """A REORGED deal seen again on chain (re-mined, maybe at another block): its fields
        replaced by ``deal`` (read again from the chain) and its tasks stored again. True when
        this call revived it (another scheduler may have done it first)."""
        now = utcnow()
        fields = {k: v for k, v in deal.items() if k not in ("chainDealId", "timeline")}
        stale = {"$unset": {"skipReason": ""}} if "skipReason" not in fields else {}
        result = self.deals.update_one(
            {"chainDealId": deal["chainDealId"], "status": str(DealStatus.REORGED)},
            {
                **stale,
                "$set": {**fields, "updatedAt": now},
                "$push": {
                    "timeline": {
                        "status": deal["status"],
                        "at": now,
                        "note": f"seen again at block {deal['blockNumber']}",
                    }
                },
            },
        )
        if result.modified_count != 1:
            return False
        self.save_deal(deal, tasks)  # the deal exists: only its tasks are inserted
        return True

    def task(self, taskid: str) -> dict[str, Any] | None:
        return self.tasks.find_one({"chainTaskId": taskid}, {"_id": 0})

    def tasks_in(
        self,
        statuses: Iterable[TaskStatus],
        limit: int = 0,
        *,
        fields: Iterable[str] | None = None,
        ordered: bool = True,
        **match: Any,
    ) -> list[dict[str, Any]]:
        """Tasks in any of ``statuses``, earliest final deadline first (unless ``ordered`` is
        False). ``fields`` limits what is read of each task: the per-tick passes over every
        running task only need a few fields, not the documents with their timelines."""
        query = {"status": {"$in": [str(s) for s in statuses]}, **match}
        cursor = self.tasks.find(query, _projection(fields))
        if ordered:
            cursor = cursor.sort([("finalDeadline", 1), ("chainTaskId", 1)])
        if limit:
            cursor = cursor.limit(limit)
        return list(cursor)

    def tasks_page(
        self,
        status: TaskStatus,
        limit: int,
        *,
        fields: Iterable[str],
        skip_deals: Iterable[str] = (),
        skip_tasks: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        """At most ``limit`` tasks in ``status``, earliest final deadline first (the index
        (status, finalDeadline, chainTaskId) serves the order: a page costs its size, not the
        backlog's), leaving out those of the deals in ``skip_deals`` and the tasks in
        ``skip_tasks``; ``chainTaskId`` is always read."""
        query: dict[str, Any] = {"status": str(status)}
        skip = sorted(set(skip_deals))
        if skip:
            query["chainDealId"] = {"$nin": skip}
        left_out = sorted(set(skip_tasks))
        if left_out:
            query["chainTaskId"] = {"$nin": left_out}
        cursor = self.tasks.find(query, _projection({"chainTaskId", *fields}))
        cursor = cursor.sort([("finalDeadline", 1), ("chainTaskId", 1)]).limit(limit)
        return list(cursor)

    def tasks_due(
        self,
        statuses: Iterable[TaskStatus],
        due: str,
        upto: Any,
        *,
        fields: Iterable[str],
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        """Tasks in ``statuses`` whose ``due`` time (one of :data:`TASK_DUE_FIELDS`) is at
        or before ``upto``, earliest first; at most ``limit`` of them (0: all). With
        ``upto`` None: those without that time. The (status, ``due``) index answers it."""
        if due not in TASK_DUE_FIELDS:
            raise ValueError(f"{due} is not an indexed due time of tasks")
        cond: Any = None if upto is None else {"$lte": upto}
        query = {"status": {"$in": [str(s) for s in statuses]}, due: cond}
        cursor = self.tasks.find(query, _projection({"chainTaskId", due, *fields}))
        if upto is not None:
            cursor = cursor.sort(due, 1)
        if limit:
            cursor = cursor.limit(limit)
        return list(cursor)

    def tasks_by_id(self, taskids: Iterable[str], *, fields: Iterable[str]) -> list[dict[str, Any]]:
        """The tasks of ``taskids`` (one ``$in`` query per :data:`IN_BATCH`), with ``fields``."""
        ids = list(dict.fromkeys(taskids))
        found: list[dict[str, Any]] = []
        for start in range(0, len(ids), IN_BATCH):
            query = {"chainTaskId": {"$in": ids[start : start + IN_BATCH]}}
            found.extend(self.tasks.find(query, _projection({"chainTaskId", *fields})))
        return found

    def mark_for_review(self, taskid: str) -> None:
        """Something happened to the task that the next tick should look at (a replicate
        failed, a worker was lost, a winner revealed late): its ``reviewAt`` mark is set."""
        self.tasks.update_one({"chainTaskId": taskid}, {"$set": {"reviewAt": utcnow()}})

    def move_review_mark(self, taskid: str, marked: Any, to: dt.datetime | None) -> None:
        """The tick looked at the task for its mark of ``marked``: the mark goes (``to``
        None) or moves to ``to``, unless a newer one came meanwhile."""
        change = {"$unset": {"reviewAt": ""}} if to is None else {"$set": {"reviewAt": to}}
        self.tasks.update_one({"chainTaskId": taskid, "reviewAt": marked}, change)

    def tasks_after(
        self, statuses: Iterable[TaskStatus], after: str, *, fields: Iterable[str], limit: int
    ) -> list[dict[str, Any]]:
        """At most ``limit`` tasks in ``statuses`` whose id comes after ``after``, by id (the
        (status, chainTaskId) index: a round robin over them costs a page per call)."""
        query = {"status": {"$in": [str(s) for s in statuses]}, "chainTaskId": {"$gt": after}}
        cursor = self.tasks.find(query, _projection({"chainTaskId", *fields}))
        return list(cursor.sort("chainTaskId", 1).limit(limit))

    def transition_tasks(
        self,
        taskids: Iterable[str],
        new: TaskStatus,
        *,
        tx_hash: str | None = None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
        inc: dict[str, int] | None = None,
    ) -> int:
        """Move many tasks to ``new`` at once (one round trip per :data:`IN_BATCH`), each only
        from a status that allows it (a task elsewhere is left as it is); how many moved.
        The counterpart of :meth:`transition_task` for the tick's batches."""
        now = utcnow()
        event = _event(new, now, tx_hash, note)
        moved = 0
        ids = list(dict.fromkeys(taskids))
        update: dict[str, Any] = {
            "$set": {**(extra or {}), "status": str(new), "updatedAt": now},
            "$push": {"timeline": event},
        }
        if inc:
            update["$inc"] = inc
        for start in range(0, len(ids), IN_BATCH):
            done = self.tasks.update_many(
                {
                    "chainTaskId": {"$in": ids[start : start + IN_BATCH]},
                    "status": {"$in": predecessors(TASK_TRANSITIONS, new)},
                },
                update,
            )
            moved += int(done.modified_count)
        return moved

    def unset_enqueued(self, taskid: str, enqueued_at: Any) -> None:
        """The task is owed no job any more (every replicate it needs is granted): it leaves
        the lost-jobs pass, unless it was enqueued again meanwhile."""
        self.tasks.update_one(
            {"chainTaskId": taskid, "enqueuedAt": enqueued_at}, {"$unset": {"enqueuedAt": ""}}
        )

    def owed_jobs(
        self, queue: str, statuses: Iterable[TaskStatus], enqueued_before: float, limit: int
    ) -> list[dict[str, Any]]:
        """Tasks of ``queue`` in ``statuses`` enqueued last before ``enqueued_before`` (a time
        from ``time.time()``) that may still be owed jobs, oldest first, at most ``limit``."""
        query = {
            "status": {"$in": [str(s) for s in statuses]},
            "queue": queue,
            "enqueuedAt": {"$lte": enqueued_before},
        }
        fields = (
            "chainTaskId",
            "queue",
            "contributionDeadline",
            "replicatesNeeded",
            "replicatesGranted",
            "enqueuedAt",
        )
        cursor = self.tasks.find(query, _projection(fields)).sort("enqueuedAt", 1).limit(limit)
        return list(cursor)

    def explain_waiting(self, queue: str, statuses: Iterable[TaskStatus], reason: str) -> int:
        """Every task of ``queue`` in ``statuses`` that no worker took yet says ``reason``
        (why it waits; empty: it does not wait for a worker); how many changed."""
        done = self.tasks.update_many(
            {
                "status": {"$in": [str(s) for s in statuses]},
                "queue": queue,
                "replicatesGranted": 0,
                "waitingReason": {"$ne": reason},
            },
            {"$set": {"waitingReason": reason}},
        )
        return int(done.modified_count)

    def transition_task(
        self,
        taskid: str,
        new: TaskStatus,
        *,
        tx_hash: str | None = None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
        inc: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """Move a task to ``new`` if its current status allows it; return the new document.

        Re-applying the status it already has is a no-op (idempotent); anything else not in
        :data:`TASK_TRANSITIONS` raises :class:`InvalidTransition`.
        """
        return _transition(
            self.tasks, {"chainTaskId": taskid}, TASK_TRANSITIONS, new, tx_hash, note, extra, inc
        )

    def claim_task(
        self,
        taskid: str,
        expected: Iterable[TaskStatus],
        new: TaskStatus,
        *,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
        match: dict[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Strict compare-and-set: move the task to ``new`` only from one of ``expected``
        (and only while its fields equal ``match``).

        Returns None when another thread or process moved it first, so exactly one caller
        goes on to do the work the new status stands for (send finalize, claim ...).
        """
        allowed = set(predecessors(TASK_TRANSITIONS, new))
        wanted = [str(s) for s in expected if str(s) in allowed]
        now = utcnow()
        event: dict[str, Any] = {"status": str(new), "at": now}
        if note:
            event["note"] = redact_urls(note)
        doc = self.tasks.find_one_and_update(
            {**(match or {}), "chainTaskId": taskid, "status": {"$in": wanted}},
            {
                "$set": {**(extra or {}), "status": str(new), "updatedAt": now},
                "$push": {"timeline": event},
            },
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else dict(doc)

    def set_task_fields(self, taskid: str, fields: dict[str, Any]) -> None:
        self.tasks.update_one({"chainTaskId": taskid}, {"$set": fields})

    def reserve_replicate(self, taskid: str, needed: int) -> bool:
        """Count one more replicate granted on ``taskid`` unless the ``needed`` ones already
        are (atomic: two racing workers never over-subscribe a task). False when full, or
        when ``needed`` changed meanwhile (re-planned)."""
        return (
            self.tasks.find_one_and_update(
                {
                    "chainTaskId": taskid,
                    "replicatesNeeded": needed,
                    "replicatesGranted": {"$lt": needed},
                },
                {"$inc": {"replicatesGranted": 1}},
            )
            is not None
        )

    def release_replicate(self, taskid: str) -> None:
        """Undo a :meth:`reserve_replicate` whose replicate could not be created."""
        self.tasks.update_one({"chainTaskId": taskid}, {"$inc": {"replicatesGranted": -1}})

    def plan_more_replicates(
        self, taskid: str, needed: int, more: int, status: str, note: str
    ) -> dict[str, Any] | None:
        """Raise the task's needed replicates (and queued jobs) by ``more``, from ``needed``
        only, so that of two threads re-planning at once one does; the new document, or None
        when another one re-planned first."""
        doc = self.tasks.find_one_and_update(
            {"chainTaskId": taskid, "replicatesNeeded": needed},
            {
                "$inc": {"replicatesNeeded": more, "jobsQueued": more},
                "$push": {"timeline": {"status": status, "at": utcnow(), "note": note}},
            },
            projection={"_id": 0},
            return_document=ReturnDocument.AFTER,
        )
        return None if doc is None else dict(doc)

    def backlog(
        self, queue: str, waiting: Iterable[TaskStatus], planned: Iterable[TaskStatus]
    ) -> int:
        """Replicates sold on ``queue`` that no worker has taken yet: all those of tasks in
        ``waiting`` statuses, the queued but not granted ones of tasks in ``planned``."""
        total = 0
        for task in self.tasks.find(
            {"queue": queue, "status": {"$in": [str(s) for s in waiting]}},
            {"_id": 0, "replicatesNeeded": 1},
        ):
            total += int(task.get("replicatesNeeded") or 1)
        for task in self.tasks.find(
            {"queue": queue, "status": {"$in": [str(s) for s in planned]}},
            {"_id": 0, "jobsQueued": 1, "replicatesGranted": 1},
        ):
            total += max(
                0, int(task.get("jobsQueued") or 0) - int(task.get("replicatesGranted") or 0)
            )
        return total

    # ---- replicates ---------------------------------------------------------------------
    def create_replicate(self, taskid: str, worker: str, fields: dict[str, Any]) -> bool:
        """Insert the (task, worker) replicate; False when that worker already has one."""
        now = utcnow()
        doc = {
            **fields,
            "chainTaskId": taskid,
            "worker": worker.lower(),
            "status": str(ReplicateStatus.CREATED),
            "createdAt": now,
            "updatedAt": now,
            "stallAt": now,  # its progress bound is looked at (:meth:`replicates_due`)
            "timeline": [{"status": str(ReplicateStatus.CREATED), "at": now}],
        }
        try:
            self.replicates.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    def replicates_of(self, taskid: str) -> list[dict[str, Any]]:
        return list(self.replicates.find({"chainTaskId": taskid}, {"_id": 0}))

    def replicates_of_tasks(
        self,
        taskids: Iterable[str],
        *,
        fields: Iterable[str] | None = None,
        batch: int | None = None,
    ) -> dict[str, list[dict[str, Any]]]:
        """The replicates of many tasks by task id, read with one ``$in`` query per ``batch``
        tasks (default :data:`IN_BATCH`; a task without replicates is absent). ``chainTaskId``
        is always read."""
        size = batch or IN_BATCH
        ids = list(dict.fromkeys(taskids))
        wanted = None if fields is None else {"chainTaskId", *fields}
        found: dict[str, list[dict[str, Any]]] = {}
        for start in range(0, len(ids), size):
            query = {"chainTaskId": {"$in": ids[start : start + size]}}
            for rep in self.replicates.find(query, _projection(wanted)):
                found.setdefault(rep["chainTaskId"], []).append(rep)
        return found

    def advance_replicate(
        self,
        taskid: str,
        worker: str,
        target: ReplicateStatus,
        *,
        tx_hash: str | None = None,
        note: str | None = None,
        cause: str | None = None,
        extra: dict[str, Any] | None = None,
        stale_from: frozenset[str] = frozenset(),
        check: Callable[[dict[str, Any], list[ReplicateStatus]], None] | None = None,
        passed: Mapping[ReplicateStatus, dt.datetime] | None = None,
    ) -> dict[str, Any] | None:
        """Bring a replicate to ``target`` through the allowed statuses in between (reports
        can be processed out of order), in one write. Returns None for a stale report
        (``target`` is behind the current status, or the replicate is in one of
        ``stale_from``: a transition back the report does not mean) or an unknown replicate.

        ``passed``: the statuses the worker says it went through on the way, and when: the
        timeline records them at that time (kept between the replicate's last change and
        now); the others in between are recorded as implied by the report.

        ``check`` sees the replicate and the statuses about to be walked (none when the
        replicate is there already) before anything is written, and may raise to stop the
        walk: a worker's report crosses no status whose claim the chain has not confirmed."""
        for _ in range(3):  # a concurrent report may move it while we walk
            current = self.replicate(taskid, worker)
            if current is None or current["status"] in stale_from:
                return None
            path = _route(ReplicateStatus(current["status"]), list(passed or ()), target)
            if path is None:
                return None
            if check is not None:
                check(current, path)
            if not path:
                return current
            now = utcnow()
            floor = current.get("updatedAt") or now
            through: list[tuple[ReplicateStatus, dt.datetime | None]] = []
            for step in path[:-1]:
                at = (passed or {}).get(step)
                if at is not None:  # a worker's clock: in order, and not ahead of ours
                    at = floor = min(max(at, floor), now)
                through.append((step, at))
            try:
                return self.transition_replicate(
                    taskid,
                    worker,
                    target,
                    tx_hash=tx_hash,
                    note=note,
                    cause=cause,
                    extra=extra,
                    through=through,
                )
            except InvalidTransition:
                continue
        return None

    def replicate(self, taskid: str, worker: str) -> dict[str, Any] | None:
        return self.replicates.find_one(
            {"chainTaskId": taskid, "worker": worker.lower()}, {"_id": 0}
        )

    def set_replicate_fields(self, taskid: str, worker: str, fields: dict[str, Any]) -> None:
        self.replicates.update_one(
            {"chainTaskId": taskid, "worker": worker.lower()}, {"$set": fields}
        )

    def mark_reveal_requested(self, taskid: str, worker: str) -> bool:
        """Note that ``worker`` was asked to reveal; False when it already was (so that of
        two threads, one sends the request)."""
        done = self.replicates.update_one(
            {"chainTaskId": taskid, "worker": worker.lower(), "revealRequested": {"$ne": True}},
            {"$set": {"revealRequested": True}},
        )
        return bool(done.modified_count)

    def reset_reveal_requests(self, taskid: str) -> None:
        """Winners of ``taskid`` still CONTRIBUTED may be asked to reveal again."""
        self.replicates.update_many(
            {"chainTaskId": taskid, "status": str(ReplicateStatus.CONTRIBUTED)},
            {"$set": {"revealRequested": False}},
        )

    def abort_replicates(
        self, taskid: str, statuses: Iterable[str], note: str, cause: str | None = None
    ) -> list[str]:
        """Every replicate of ``taskid`` in one of ``statuses`` goes to ABORTED; the workers
        whose replicate moved now."""
        wanted = set(statuses)
        moved = []
        for rep in self.replicates_of(taskid):
            if rep["status"] in wanted and self.advance_replicate(
                taskid, rep["worker"], ReplicateStatus.ABORTED, note=note, cause=cause
            ):
                moved.append(rep["worker"])
        return moved

    def replicates_due(
        self, statuses: Iterable[str], upto: dt.datetime, *, fields: Iterable[str], limit: int
    ) -> list[dict[str, Any]]:
        """At most ``limit`` replicates in one of ``statuses`` whose stall mark (``stallAt``:
        set to the time of each status change, moved on by the progress bounds' pass) is at or
        before ``upto``, earliest first; the (status, stallAt) index answers it."""
        query = {"status": {"$in": sorted(statuses)}, "stallAt": {"$lte": upto}}
        wanted = {"chainTaskId", "worker", "stallAt", *fields}
        cursor = self.replicates.find(query, _projection(wanted)).sort("stallAt", 1)
        return list(cursor.limit(limit))

    def move_stall_mark(self, taskid: str, worker: str, marked: Any, to: dt.datetime) -> None:
        """The progress bounds' pass looked at the replicate for its mark of ``marked``: the
        mark moves to ``to``, unless the replicate changed meanwhile (which set a new one)."""
        self.replicates.update_one(
            {"chainTaskId": taskid, "worker": worker.lower(), "stallAt": marked},
            {"$set": {"stallAt": to}},
        )

    def mark_unmarked_replicates(self, statuses: Iterable[str]) -> int:
        """Replicates in one of ``statuses`` without a stall mark (stored by an earlier
        version) get one now; how many."""
        done = self.replicates.update_many(
            {"status": {"$in": sorted(statuses)}, "stallAt": None}, {"$set": {"stallAt": utcnow()}}
        )
        return int(done.modified_count)

    def replicates_of_worker(
        self,
        worker: str,
        statuses: Iterable[str] | None = None,
        *,
        limit: int = 0,
        newest_first: bool = False,
        with_timeline: bool = True,
        hide: Iterable[str] = (),
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"worker": worker.lower()}
        if statuses is not None:
            query["status"] = {"$in": sorted(statuses)}
        projection = _hiding(["_id", *hide] if with_timeline else ["_id", "timeline", *hide])
        cursor = self.replicates.find(query, projection)
        if newest_first:
            cursor = cursor.sort("_id", -1)
        if limit:
            cursor = cursor.limit(limit)
        return list(cursor)

    def count_replicates_of_worker(self, worker: str, statuses: Iterable[str]) -> int:
        """The worker's replicates in one of ``statuses`` (the ``worker`` index)."""
        return int(
            self.replicates.count_documents(
                {"worker": worker.lower(), "status": {"$in": sorted(statuses)}}
            )
        )

    def replicate_durations(self) -> list[float]:
        """Seconds the app ran, of every replicate whose worker reported it."""
        return [
            float(doc["duration"])
            for doc in self.replicates.find(
                {"duration": {"$exists": True}}, {"_id": 0, "duration": 1}
            )
            if isinstance(doc.get("duration"), int | float)
        ]

    def transition_replicate(
        self,
        taskid: str,
        worker: str,
        new: ReplicateStatus,
        *,
        tx_hash: str | None = None,
        note: str | None = None,
        cause: str | None = None,
        extra: dict[str, Any] | None = None,
        through: Sequence[tuple[ReplicateStatus, dt.datetime | None]] = (),
    ) -> dict[str, Any]:
        return _transition(
            self.replicates,
            {"chainTaskId": taskid, "worker": worker.lower()},
            REPLICATE_TRANSITIONS,
            new,
            tx_hash,
            note,
            extra,
            None,
            cause,
            # a change: its progress bound is looked at from now (:meth:`replicates_due`)
            marks=("stallAt",),
            through=through,
        )

    # ---- compute logs -----------------------------------------------------------------------
    def add_compute_logs(
        self, taskid: str, worker: str, stdout: str, stderr: str, expires_at: dt.datetime
    ) -> bool:
        """Keep ``worker``'s compute logs of ``taskid`` until ``expires_at``; True when
        stored now. A worker's first logs win (a report processed twice adds nothing), and a
        task keeps at most :data:`MAX_TASK_LOGS` workers' logs."""
        entry = {"walletAddress": worker.lower(), "stdout": stdout, "stderr": stderr}
        try:
            done = self.task_logs.update_one(
                {
                    "chainTaskId": taskid,
                    "computeLogsList.walletAddress": {"$ne": worker.lower()},
                    f"computeLogsList.{MAX_TASK_LOGS - 1}": {"$exists": False},
                },
                {
                    "$push": {"computeLogsList": entry},
                    "$setOnInsert": {"expiresAt": expires_at, "createdAt": utcnow()},
                },
                upsert=True,
            )
        except DuplicateKeyError:  # the task's document exists and refuses this entry
            return False
        return bool(done.modified_count or done.upserted_id is not None)

    def compute_logs(self, taskid: str, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """The task's compute logs still within their retention (None-safe: [] when none)."""
        doc = self.task_logs.find_one(
            {"chainTaskId": taskid, "expiresAt": {"$gt": now or utcnow()}},
            {"_id": 0, "computeLogsList": 1},
        )
        return list((doc or {}).get("computeLogsList") or [])

    def purge_compute_logs(self, now: dt.datetime | None = None) -> int:
        """Delete the compute logs whose retention is over; how many tasks' logs went."""
        done = self.task_logs.delete_many({"expiresAt": {"$lte": now or utcnow()}})
        return int(done.deleted_count)

    # ---- workers --------------------------------------------------------------------------
    def worker(self, address: str) -> dict[str, Any] | None:
        return self.workers.find_one({"address": address.lower()}, {"_id": 0})

    def all_workers(self) -> list[dict[str, Any]]:
        """Every worker by address (one document per node: few, read whole)."""
        return list(self.workers.find({}, {"_id": 0}).sort("address", 1))

    def workers_with_status(self, status: WorkerStatus) -> list[dict[str, Any]]:
        return list(self.workers.find({"status": str(status)}, {"_id": 0}))

    def record_heartbeat(self, address: str, fields: dict[str, Any]) -> str | None:
        """The node is ALIVE with ``fields``; returns the status it had (None: new)."""
        previous = self.workers.find_one_and_update(
            {"address": address.lower()},
            {
                "$set": {**fields, "lastSeen": utcnow(), "status": str(WorkerStatus.ALIVE)},
                "$setOnInsert": {"registeredAt": utcnow()},
            },
            projection={"_id": 0, "status": 1},
            upsert=True,
        )
        return None if previous is None else previous.get("status")

    def mark_worker_lost(self, address: str) -> bool:
        """ALIVE -> LOST; False when it was not ALIVE any more (a heartbeat came, or another
        scheduler marked it first)."""
        done = self.workers.update_one(
            {"address": address.lower(), "status": str(WorkerStatus.ALIVE)},
            {"$set": {"status": str(WorkerStatus.LOST), "lostAt": utcnow()}},
        )
        return bool(done.modified_count)

    def served_capabilities(self) -> set[str]:
        """The capabilities (replicate queues' names) that some ALIVE worker serves (one
        read of the live workers: a fleet, not the tasks)."""
        served: set[str] = set()
        for worker in self.workers.find(
            {"status": str(WorkerStatus.ALIVE)}, {"_id": 0, "capabilities": 1}
        ):
            served.update(worker.get("capabilities") or [])
        return served

    def count_serving(self, capability: str) -> int:
        """ALIVE workers that serve ``capability``."""
        return int(
            self.workers.count_documents(
                {"status": str(WorkerStatus.ALIVE), "capabilities": capability}
            )
        )

    def count_live(self, capability: str, seen_since: dt.datetime) -> int:
        """ALIVE workers heard from since ``seen_since`` that serve ``capability``."""
        return int(
            self.workers.count_documents(
                {
                    "status": str(WorkerStatus.ALIVE),
                    "capabilities": capability,
                    "lastSeen": {"$gte": seen_since},
                }
            )
        )

    def free_slots(self, capability: str, seen_since: dt.datetime) -> int:
        """Idle slots (``slots - busySlots`` of their last heartbeat) of ALIVE workers heard
        from since ``seen_since`` that serve ``capability``; a node that says it gives jobs
        back (no gas, too little stake) offers none."""
        free = 0
        for worker in self.workers.find(
            {"status": str(WorkerStatus.ALIVE)},
            {"_id": 0, "slots": 1, "busySlots": 1, "capabilities": 1, "lastSeen": 1, "refusing": 1},
        ):
            seen = worker.get("lastSeen")
            if seen is None or seen < seen_since or worker.get("refusing"):
                continue
            if capability not in (worker.get("capabilities") or ["standard"]):
                continue
            free += max(0, int(worker.get("slots") or 0) - int(worker.get("busySlots") or 0))
        return free

    def worker_succeeded(self, address: str) -> None:
        self.workers.update_one({"address": address.lower()}, {"$set": {"consecutiveFailures": 0}})

    def worker_failed(self, address: str) -> int:
        """Count a failure; returns the worker's consecutive failures (0: unknown worker)."""
        doc = self.workers.find_one_and_update(
            {"address": address.lower()},
            {"$inc": {"consecutiveFailures": 1, "failures": 1}},
            return_document=ReturnDocument.AFTER,
        )
        return 0 if doc is None else int(doc.get("consecutiveFailures", 0))

    def pause_worker(self, address: str, until: dt.datetime) -> None:
        self.workers.update_one(
            {"address": address.lower()},
            {"$set": {"pausedUntil": until, "consecutiveFailures": 0}},
        )

    def count_verdict(self, address: str, proved: bool) -> None:
        """One more contribution of the worker accepted (proved) or rejected on chain."""
        self.workers.update_one(
            {"address": address.lower()}, {"$inc": {"accepted" if proved else "rejected": 1}}
        )

    def forget_worker(self, address: str, last_seen: Any) -> bool:
        """Delete the worker's document as it was when judged LOST (same ``lastSeen``): a
        heartbeat that came meanwhile keeps it."""
        done = self.workers.delete_one({"address": address.lower(), "lastSeen": last_seen})
        return bool(done.deleted_count)

    # ---- reads of the status API ------------------------------------------------------------
    def count_by_status(
        self, collection: str, match: dict[str, Any] | None = None
    ) -> dict[str, int]:
        """Documents of ``collection`` (deals, tasks, replicates) by status."""
        pipeline: list[dict[str, Any]] = []
        if match:
            pipeline.append({"$match": match})
        pipeline.append({"$group": {"_id": "$status", "n": {"$sum": 1}}})
        rows = self._collection(collection).aggregate(pipeline)
        return {str(row["_id"]): int(row["n"]) for row in rows}

    def task_counts_by_deal(self, dealids: list[str]) -> dict[str, dict[str, int]]:
        """deal id -> task status -> count, for the deals of one page."""
        if not dealids:
            return {}
        rows = self.tasks.aggregate(
            [
                {"$match": {"chainDealId": {"$in": dealids}}},
                {
                    "$group": {
                        "_id": {"deal": "$chainDealId", "status": "$status"},
                        "n": {"$sum": 1},
                    }
                },
            ]
        )
        counts: dict[str, dict[str, int]] = {}
        for row in rows:
            counts.setdefault(row["_id"]["deal"], {})[row["_id"]["status"]] = int(row["n"])
        return counts

    def count(self, collection: str, query: dict[str, Any]) -> int:
        return int(self._collection(collection).count_documents(query))

    def page(
        self,
        collection: str,
        query: dict[str, Any],
        skip: int,
        limit: int,
        *,
        with_timeline: bool = True,
    ) -> list[dict[str, Any]]:
        """Documents of ``collection`` matching ``query``, newest first."""
        projection = {"_id": 0} if with_timeline else {"_id": 0, "timeline": 0}
        cursor = self._collection(collection).find(query, projection).sort("_id", -1)
        return list(cursor.skip(skip).limit(limit))

    def tasks_of_deal(self, dealid: str) -> list[dict[str, Any]]:
        """The deal's tasks by index, each with its status and last change."""
        return list(
            self.tasks.find(
                {"chainDealId": dealid},
                {"_id": 0, "chainTaskId": 1, "index": 1, "status": 1, "updatedAt": 1},
            ).sort("index", 1)
        )

    def replicates_in_order(self, taskid: str, hide: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The task's replicates, first granted first (without the fields in ``hide``)."""
        cursor = self.replicates.find({"chainTaskId": taskid}, _hiding(["_id", *hide]))
        return list(cursor.sort("_id", 1))

    def transactions(
        self, sent: dict[str, list[str]], failed: dict[str, list[str]]
    ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
        """Per (collection, status): distinct transaction hashes in the timelines for the
        statuses of ``sent``, and timeline entries for the statuses of ``failed`` (both
        collection -> statuses)."""
        hashes: dict[tuple[str, str], int] = {}
        entries: dict[tuple[str, str], int] = {}
        for name, statuses in sent.items():
            rows = self._collection(name).aggregate(
                [
                    {"$unwind": "$timeline"},
                    {
                        "$match": {
                            "timeline.status": {"$in": statuses},
                            "timeline.txHash": {"$gt": ""},
                        }
                    },
                    {"$group": {"_id": {"s": "$timeline.status", "tx": "$timeline.txHash"}}},
                ]
            )
            for row in rows:
                key = (name, row["_id"]["s"])
                hashes[key] = hashes.get(key, 0) + 1
        for name, statuses in failed.items():
            rows = self._collection(name).aggregate(
                [
                    {"$unwind": "$timeline"},
                    {"$match": {"timeline.status": {"$in": statuses}}},
                    {"$group": {"_id": "$timeline.status", "n": {"$sum": 1}}},
                ]
            )
            for row in rows:
                entries[(name, row["_id"])] = int(row["n"])
        return hashes, entries

    def _collection(self, name: str) -> Collection[Any]:
        if name not in ("deals", "tasks", "replicates", "workers"):
            raise ValueError(f"no collection {name!r} in the store")
        collection: Collection[Any] = getattr(self, name)
        return collection


def _hiding(fields: Iterable[str]) -> dict[str, int]:
    """A find() projection: the whole document but ``fields``."""
    return {name: 0 for name in fields}


def _projection(fields: Iterable[str] | None) -> dict[str, int]:
    """A find() projection: the whole document but its ``_id``, or only ``fields``."""
    if fields is None:
        return {"_id": 0}
    return {"_id": 0, **{name: 1 for name in fields}}


def _route(
    current: ReplicateStatus, passed: list[ReplicateStatus], target: ReplicateStatus
) -> list[ReplicateStatus] | None:
    """The statuses from ``current`` to ``target``: through the ones the worker says it
    passed, in their order, when that is a way the transitions allow; otherwise the shortest
    way (:func:`path_to`), or None when ``target`` cannot be reached."""
    route: list[ReplicateStatus] = []
    at = current
    for step in [*passed, target]:
        leg = path_to(REPLICATE_TRANSITIONS, at, step)
        if leg is None:
            return path_to(REPLICATE_TRANSITIONS, current, target)
        route += leg
        at = step
    return route


def _event(
    new: Any, now: dt.datetime, tx_hash: str | None, note: str | None, cause: str | None = None
) -> dict[str, Any]:
    """A timeline entry: the status, when, and the transaction, note and cause if any."""
    event: dict[str, Any] = {"status": str(new), "at": now}
    if tx_hash:
        event["txHash"] = tx_hash
    if note:
        event["note"] = redact_urls(note)
    if cause:
        event["cause"] = str(cause)
    return event


def _transition(
    collection: Collection[Any],
    key: dict[str, Any],
    table: dict[Any, frozenset[Any]],
    new: Any,
    tx_hash: str | None,
    note: str | None,
    extra: dict[str, Any] | None,
    inc: dict[str, int] | None,
    cause: str | None = None,
    marks: Iterable[str] = (),
    through: Sequence[tuple[Any, dt.datetime | None]] = (),
) -> dict[str, Any]:
    """Move the document at ``key`` to ``new`` from a status that allows it (its fields
    ``marks`` set to the time of the change, as ``updatedAt``). ``through``: the statuses
    walked on the way, each allowed from the one before, recorded in the timeline before
    ``new`` in the same write: at their time, or now as implied by the change."""
    now = utcnow()
    events = [
        _event(step, at or now, None, None if at else "implied by a later report")
        for step, at in through
    ]
    events.append(_event(new, now, tx_hash, note, cause))
    update: dict[str, Any] = {
        "$set": {
            **(extra or {}),
            **dict.fromkeys(marks, now),
            "status": str(new),
            "updatedAt": now,
        },
        "$push": {"timeline": events[0] if len(events) == 1 else {"$each": events}},
    }
    if inc:
        update["$inc"] = inc
    first = through[0][0] if through else new
    doc = collection.find_one_and_update(
        {**key, "status": {"$in": predecessors(table, first)}},
        update,
        projection={"_id": 0},
        return_document=ReturnDocument.AFTER,
    )
    if doc is not None:
        return dict(doc)
    current = collection.find_one(key, {"_id": 0})
    if current is None:
        raise KeyError(f"no document {key}")
    if current["status"] == str(new):
        if extra or inc:
            collection.update_one(key, {k: v for k, v in update.items() if k in ("$set", "$inc")})
        return dict(current)
    raise InvalidTransition(f"{key}: {current['status']} -> {new} is not an allowed transition")
