"""Stores for tests and benchmarks: the real :class:`~pool.store.Store` on an in-memory
mongomock database, and a way to count what a piece of code asks of it."""

from __future__ import annotations

import collections
from typing import Any

from pool.store import Store

COLLECTIONS = ("deals", "tasks", "replicates", "workers", "cursors")


def memory_store(name: str = "workerpool-test") -> Store:
    """A store on a fresh in-memory database, its indexes created."""
    import mongomock_ng as mongomock

    store = Store(mongomock.MongoClient()[name])
    store.ensure_indexes()
    return store


class CountingCollection:
    """A pymongo collection that counts the calls made to it (``<collection>.<method>``) and
    the documents its finds return (``<collection>.docs_read``): on a real MongoDB those
    are the round trips and the bytes read."""

    def __init__(
        self, inner: Any, name: str, ops: collections.Counter[str], docs: bool = True
    ) -> None:
        self._inner, self._name, self._ops, self._docs = inner, name, ops, docs

    def __getattr__(self, attr: str) -> Any:
        target = getattr(self._inner, attr)
        if not callable(target):
            return target
        ops, key = self._ops, f"{self._name}.{attr}"

        def call(*a: Any, **kw: Any) -> Any:
            ops[key] += 1
            result = target(*a, **kw)
            if not self._docs:
                return result
            if attr == "find":
                return _CountingCursor(result, ops, f"{self._name}.docs_read")
            if attr in ("find_one", "find_one_and_update") and result is not None:
                ops[f"{self._name}.docs_read"] += 1
            return result

        return call


class _CountingCursor:
    def __init__(self, cursor: Any, ops: collections.Counter[str], key: str) -> None:
        self._cursor, self._ops, self._key = cursor, ops, key

    def sort(self, *a: Any, **kw: Any) -> _CountingCursor:
        self._cursor = self._cursor.sort(*a, **kw)
        return self

    def skip(self, n: int) -> _CountingCursor:
        self._cursor = self._cursor.skip(n)
        return self

    def limit(self, n: int) -> _CountingCursor:
        self._cursor = self._cursor.limit(n)
        return self

    def __iter__(self) -> Any:
        for doc in self._cursor:
            self._ops[self._key] += 1
            yield doc


def count_calls(store: Store, *, docs: bool = True) -> collections.Counter[str]:
    """Count, from now on, every call ``store`` makes to its collections (and, with
    ``docs``, the documents its finds return)."""
    ops: collections.Counter[str] = collections.Counter()
    for name in COLLECTIONS:
        setattr(store, name, CountingCollection(getattr(store, name), name, ops, docs))
    return ops
