"""The indexed mongomock that the cost tests and ops/bench use answers exactly as mongomock
does (its indexes only narrow what is scanned), and reads a sorted, limited query from a
compound index instead of the whole collection."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import random
from collections.abc import Iterator
from typing import Any

import mongomock_ng as mongomock
import pytest

from testing import indexed_mongomock

STATUSES = ["RUNNING", "REVEALING", "COMPLETED", "FAILED"]
BASE = dt.datetime(2026, 1, 1)


def _docs(rng: random.Random, n: int) -> list[dict[str, Any]]:
    docs = []
    for i in range(n):
        doc: dict[str, Any] = {"chainTaskId": f"t{i:05d}", "status": rng.choice(STATUSES)}
        if rng.random() < 0.7:
            doc["deadline"] = rng.randrange(0, 50)
        if rng.random() < 0.6:
            doc["seenAt"] = BASE + dt.timedelta(seconds=rng.randrange(0, 100))
        if rng.random() < 0.1:
            doc["deadline"] = None
        doc["queue"] = rng.choice(["a", "b"])
        docs.append(doc)
    return docs


def _queries(rng: random.Random) -> Iterator[tuple[dict[str, Any], list[tuple[str, int]], int]]:
    for _ in range(300):
        statuses = rng.sample(STATUSES, rng.randrange(1, 4))
        status: Any = statuses[0] if len(statuses) == 1 else {"$in": statuses}
        op = rng.choice(["$lt", "$lte", "$gt", "$gte"])
        field, value = rng.choice(
            [
                ("deadline", rng.randrange(0, 50)),
                ("seenAt", BASE + dt.timedelta(seconds=rng.randrange(100))),
            ]
        )
        query: dict[str, Any] = {"status": status, field: {op: value}}
        if rng.random() < 0.3:
            query["queue"] = rng.choice(["a", "b"])
        if rng.random() < 0.2:  # a batch of ids
            query["chainTaskId"] = {"$in": [f"t{rng.randrange(400):05d}" for _ in range(30)]}
        sort = [(field, rng.choice([1, -1])), ("chainTaskId", 1)][: rng.randrange(1, 3)]
        yield query, sort, rng.choice([0, 1, 5, 50])


@pytest.fixture
def indexed() -> Iterator[None]:
    indexed_mongomock.install()
    try:
        yield
    finally:
        indexed_mongomock.uninstall()


def _collection(docs: list[dict[str, Any]]) -> Any:
    collection: Any = mongomock.MongoClient()["db"]["tasks"]
    collection.create_index("chainTaskId", unique=True)
    collection.create_index([("status", 1), ("deadline", 1)])
    collection.create_index([("status", 1), ("seenAt", 1)])
    collection.create_index([("status", 1), ("queue", 1), ("seenAt", 1)])
    collection.insert_many([dict(d) for d in docs])
    return collection


def _answer(
    collection: Any, query: dict[str, Any], sort: list[tuple[str, int]], limit: int
) -> list[str]:
    cursor = collection.find(query, {"_id": 0, "chainTaskId": 1}).sort(sort)
    if limit:
        cursor = cursor.limit(limit)
    return [d["chainTaskId"] for d in cursor]


def test_answers_are_mongomocks_also_after_updates_and_deletes(indexed: None) -> None:
    rng = random.Random(21)
    docs = _docs(rng, 400)
    fast = _collection(docs)
    indexed_mongomock.uninstall()
    plain = _collection(docs)
    for step, (query, sort, limit) in enumerate(_queries(rng)):
        indexed_mongomock.install()
        got = _answer(fast, query, sort, limit)
        indexed_mongomock.uninstall()
        assert got == _answer(plain, query, sort, limit), (query, sort, limit)
        # And after the same writes on both (a status moved, a time set, a document gone)
        target = {"chainTaskId": f"t{rng.randrange(400):05d}"}
        change = {"$set": {"status": rng.choice(STATUSES), "deadline": rng.randrange(50)}}
        if step % 7 == 0:
            change = {"$unset": {"seenAt": ""}}
        indexed_mongomock.install()
        fast.update_one(target, change)
        if step % 31 == 0:
            fast.delete_one(target)
        indexed_mongomock.uninstall()
        plain.update_one(target, change)
        if step % 31 == 0:
            plain.delete_one(target)
    indexed_mongomock.install()


def test_answers_stay_mongomocks_after_every_kind_of_write(
    indexed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mongomock changes in place the documents an update reads: the indexes must follow
    # each write path (many at once, sorted, find-and-modify, replace, upsert, delete),
    # from what each update read, never from a scan of the indexes
    from pymongo import ReturnDocument

    def unexpected(*_: Any) -> None:
        raise AssertionError("a document changed where no update read it")

    monkeypatch.setattr(indexed_mongomock._Index, "_unfile_everywhere", unexpected)

    rng = random.Random(2121)
    docs = _docs(rng, 300)
    fast = _collection(docs)
    indexed_mongomock.uninstall()
    plain = _collection(docs)
    indexed_mongomock.install()

    def both(method: str, *args: Any, **kwargs: Any) -> None:
        getattr(fast, method)(*copy.deepcopy(args), **kwargs)
        indexed_mongomock.uninstall()
        try:
            getattr(plain, method)(*copy.deepcopy(args), **kwargs)
        finally:
            indexed_mongomock.install()

    for step in range(42):
        status = rng.choice(STATUSES)
        moved_to = rng.choice(STATUSES)
        deadline = rng.randrange(50)
        some = f"t{rng.randrange(320):05d}"
        kind = step % 6
        if kind == 0:
            both(
                "update_many",
                {"status": status, "deadline": {"$lt": deadline}},
                {"$set": {"status": moved_to}, "$inc": {"deadline": 3}},
            )
        elif kind == 1:
            both(
                "find_one_and_update",
                {"status": status},
                {"$set": {"seenAt": BASE, "queue": "b"}},
                sort=[("chainTaskId", -1)],
                return_document=ReturnDocument.AFTER,
            )
        elif kind == 2:
            both(
                "replace_one",
                {"chainTaskId": some},
                {"chainTaskId": some, "status": moved_to, "deadline": deadline},
                upsert=True,
            )
        elif kind == 3:
            both("update_one", {"chainTaskId": some}, {"$unset": {"deadline": ""}})
        elif kind == 4:
            both("delete_many", {"status": status, "deadline": deadline})
        else:  # an update that changes nothing, then one that changes some
            both("update_many", {"status": status}, {"$set": {"queue": "a"}})
            both("update_many", {"queue": "a"}, {"$set": {"seenAt": BASE}})
        for query, sort, limit in itertools.islice(_queries(rng), 6):
            got = _answer(fast, query, sort, limit)
            indexed_mongomock.uninstall()
            try:
                assert got == _answer(plain, query, sort, limit), (step, query, sort, limit)
            finally:
                indexed_mongomock.install()


def test_a_sorted_limited_range_reads_its_page_not_the_collection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (mongomock's filter counted: the documents a query looks at)
    import mongomock_ng.filtering as filtering

    checked: list[Any] = []
    original = filtering.filter_applies

    def counting(spec: Any, doc: Any, *a: Any, **kw: Any) -> Any:
        checked.append(doc.get("chainTaskId"))
        return original(spec, doc, *a, **kw)

    monkeypatch.setattr(filtering, "filter_applies", counting)
    indexed_mongomock.install()
    try:
        collection = _collection(
            [
                {
                    "chainTaskId": f"t{i:05d}",
                    "status": "RUNNING",
                    "seenAt": BASE + dt.timedelta(seconds=i),
                }
                for i in range(5000)
            ]
        )
        query = {
            "status": {"$in": ["RUNNING", "FAILED"]},
            "seenAt": {"$lte": BASE + dt.timedelta(hours=9)},
        }
        checked.clear()
        page = _answer(collection, query, [("seenAt", 1)], 10)
        looked = len(checked)
    finally:
        indexed_mongomock.uninstall()
    assert page == [f"t{i:05d}" for i in range(10)]
    assert 10 <= looked <= 11  # the page (and the one after it at most), not 5,000
