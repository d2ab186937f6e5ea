"""The MongoDB store: deals, tasks, replicates, workers, chain cursors.

MongoDB is the source of truth of the scheduler. Every write here is idempotent or a
conditional update, so a crashed or duplicated scheduler never loses nor duplicates a deal:

* deals and tasks are inserted with ``$setOnInsert`` upserts keyed by unique indexes;
* a status change is one ``find_one_and_update`` filtered on the statuses allowed to lead to
  the new one (:mod:`pool.states`), which also appends to the document's ``timeline``;
* a chain cursor only moves forward (``$max``).

Only plain MongoDB operators are used, so the same code runs on mongomock in tests.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterable
from typing import Any

import pymongo
from pymongo import ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from pool.settings import Settings
from pool.states import (
    REPLICATE_TRANSITIONS,
    TASK_TRANSITIONS,
    InvalidTransition,
    ReplicateStatus,
    TaskStatus,
    path_to,
    predecessors,
)

log = logging.getLogger(__name__)

# ids per ``$in`` query when many tasks' replicates are read at once (a bounded query size)
IN_BATCH = 1000


def utcnow() -> dt.datetime:
    # Mongo stores millisecond precision; trim so round-trips compare equal
    now = dt.datetime.now(dt.UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000, tzinfo=None)


def connect(settings: Settings) -> Store:
    """Build the store named by the settings (``mongomock://`` gives an in-memory one)."""
    uri = settings.mongo_uri()
    client: Any
    if uri.startswith("mongomock://"):
        import mongomock_ng as mongomock

        client = mongomock.MongoClient()
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

    def ensure_indexes(self) -> None:
        self.deals.create_index("chainDealId", unique=True)
        self.tasks.create_index("chainTaskId", unique=True)
        self.tasks.create_index([("status", 1), ("finalDeadline", 1)])
        # contribution_timeouts: a range on the deadline within the contributing statuses
        self.tasks.create_index([("status", 1), ("contributionDeadline", 1)])
        self.tasks.create_index("chainDealId")
        self.replicates.create_index([("chainTaskId", 1), ("worker", 1)], unique=True)
        self.replicates.create_index("status")
        self.workers.create_index("address", unique=True)
        self.cursors.create_index("name", unique=True)

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
        for task in tasks:
            doc = {**task, "createdAt": now, "updatedAt": now}
            doc.setdefault("timeline", [{"status": doc["status"], "at": now}])
            # DuplicateKeyError: a concurrent scheduler inserted it first
            with contextlib.suppress(DuplicateKeyError):
                self.tasks.update_one(
                    {"chainTaskId": task["chainTaskId"]}, {"$setOnInsert": doc}, upsert=True
                )
        try:
            result = self.deals.update_one(
                {"chainDealId": deal["chainDealId"]},
                {"$setOnInsert": {**deal, "createdAt": now}},
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return result.upserted_id is not None

    def deal(self, dealid: str) -> dict[str, Any] | None:
        return self.deals.find_one({"chainDealId": dealid}, {"_id": 0})

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
    ) -> dict[str, Any] | None:
        """Strict compare-and-set: move the task to ``new`` only from one of ``expected``.

        Returns None when another thread or process moved it first, so exactly one caller
        goes on to do the work the new status stands for (send finalize, claim ...).
        """
        allowed = set(predecessors(TASK_TRANSITIONS, new))
        wanted = [str(s) for s in expected if str(s) in allowed]
        now = utcnow()
        event: dict[str, Any] = {"status": str(new), "at": now}
        if note:
            event["note"] = note
        doc = self.tasks.find_one_and_update(
            {"chainTaskId": taskid, "status": {"$in": wanted}},
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
        extra: dict[str, Any] | None = None,
        stale_from: frozenset[str] = frozenset(),
    ) -> dict[str, Any] | None:
        """Bring a replicate to ``target`` through the allowed statuses in between (reports
        can be processed out of order). Returns None for a stale report (``target`` is behind
        the current status, or the replicate is in one of ``stale_from``: a transition back
        the report does not mean) or an unknown replicate."""
        for _ in range(3):  # a concurrent report may move it while we walk
            current = self.replicate(taskid, worker)
            if current is None or current["status"] in stale_from:
                return None
            path = path_to(REPLICATE_TRANSITIONS, ReplicateStatus(current["status"]), target)
            if path is None:
                return None
            if not path:
                return current
            try:
                doc = current
                for step in path:
                    last = step == target
                    doc = self.transition_replicate(
                        taskid,
                        worker,
                        step,
                        tx_hash=tx_hash if last else None,
                        note=note if last else "implied by a later report",
                        extra=extra if last else None,
                    )
                return doc
            except InvalidTransition:
                continue
        return None

    def replicate(self, taskid: str, worker: str) -> dict[str, Any] | None:
        return self.replicates.find_one(
            {"chainTaskId": taskid, "worker": worker.lower()}, {"_id": 0}
        )

    def transition_replicate(
        self,
        taskid: str,
        worker: str,
        new: ReplicateStatus,
        *,
        tx_hash: str | None = None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
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
        )


def _projection(fields: Iterable[str] | None) -> dict[str, int]:
    """A find() projection: the whole document but its ``_id``, or only ``fields``."""
    if fields is None:
        return {"_id": 0}
    return {"_id": 0, **{name: 1 for name in fields}}


def _transition(
    collection: Collection[Any],
    key: dict[str, Any],
    table: dict[Any, frozenset[Any]],
    new: Any,
    tx_hash: str | None,
    note: str | None,
    extra: dict[str, Any] | None,
    inc: dict[str, int] | None,
) -> dict[str, Any]:
    now = utcnow()
    event: dict[str, Any] = {"status": str(new), "at": now}
    if tx_hash:
        event["txHash"] = tx_hash
    if note:
        event["note"] = note
    update: dict[str, Any] = {
        "$set": {**(extra or {}), "status": str(new), "updatedAt": now},
        "$push": {"timeline": event},
    }
    if inc:
        update["$inc"] = inc
    doc = collection.find_one_and_update(
        {**key, "status": {"$in": predecessors(table, new)}},
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
