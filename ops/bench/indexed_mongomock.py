"""mongomock with hash indexes, for the scheduler-scale benchmark only.

mongomock answers every query by scanning the whole collection (and checks unique indexes by
scanning it again on every write), so on mongomock one status change costs O(tasks): 0.25 s
per transition at 20,000 tasks. A real MongoDB serves the store's queries from its indexes
(``Store.ensure_indexes``). To measure the *scheduler* at 10,000 and 100,000 tasks rather
than mongomock's scans, :func:`install` patches mongomock (in this process only) with hash
indexes on the fields the store queries by equality or ``$in``; every candidate document is
still checked with mongomock's own ``filter_applies``, so results are exactly mongomock's.

What stays the same as on a real MongoDB: a query that returns k documents costs O(k), a
query that filters on a non-indexed field only costs O(matches of the indexed part). What
differs: no query planner, documents are deep-copied on the way out (as pymongo decodes BSON).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

INDEXED_FIELDS = ("chainTaskId", "chainDealId", "status", "worker", "address", "name")
_MISSING = object()
_installed = False


def _value(doc: dict[str, Any], field: str) -> Any:
    value = doc.get(field)
    return value if isinstance(value, Hashable) else _MISSING


class _Index:
    """field -> value -> ids (insertion ordered), and id -> value to move an id on update."""

    def __init__(self) -> None:
        self.fwd: dict[str, dict[Any, dict[Any, None]]] = {f: {} for f in INDEXED_FIELDS}
        self.rev: dict[str, dict[Any, Any]] = {f: {} for f in INDEXED_FIELDS}
        self.unindexable: dict[Any, None] = {}
        self.seq: dict[Any, int] = {}
        self.counter = 0

    def put(self, key: Any, doc: dict[str, Any]) -> None:
        if key not in self.seq:
            self.counter += 1
            self.seq[key] = self.counter
        for field in INDEXED_FIELDS:
            new = _value(doc, field)
            rev = self.rev[field]
            old = rev.get(key, _MISSING)
            if old is not _MISSING and old == new and type(old) is type(new):
                continue
            if old is not _MISSING:
                bucket = self.fwd[field].get(old)
                if bucket is not None:
                    bucket.pop(key, None)
            if new is _MISSING:
                self.unindexable[key] = None
                rev.pop(key, None)
            else:
                self.fwd[field].setdefault(new, {})[key] = None
                rev[key] = new

    def drop(self, key: Any) -> None:
        for field in INDEXED_FIELDS:
            old = self.rev[field].pop(key, _MISSING)
            if old is not _MISSING:
                bucket = self.fwd[field].get(old)
                if bucket is not None:
                    bucket.pop(key, None)
        self.unindexable.pop(key, None)
        self.seq.pop(key, None)

    def candidates(self, spec: Any) -> list[Any] | None:
        """Ids that may match ``spec`` (a superset), in insertion order; None: scan all."""
        if not isinstance(spec, dict):
            return None
        if (
            "_id" in spec
            and isinstance(spec["_id"], Hashable)
            and not isinstance(spec["_id"], dict)
        ):
            return [spec["_id"]] if spec["_id"] in self.seq else []
        best: list[dict[Any, None]] | None = None
        best_size = 0
        for field in INDEXED_FIELDS:
            if field not in spec:
                continue
            cond = spec[field]
            if isinstance(cond, dict):
                if set(cond) != {"$in"} or not isinstance(cond["$in"], list | tuple):
                    continue
                values = list(cond["$in"])
            elif isinstance(cond, Hashable):
                values = [cond]
            else:
                continue
            if not all(isinstance(v, Hashable) for v in values):
                continue
            buckets = [self.fwd[field].get(v, {}) for v in values]
            size = sum(len(b) for b in buckets)
            if best is None or size < best_size:
                best, best_size = buckets, size
        if best is None:
            return None
        found: dict[Any, None] = {}
        for bucket in best:
            found.update(bucket)
        found.update(self.unindexable)
        seq = self.seq
        return sorted(found, key=lambda k: seq.get(k, 0))


def install() -> None:
    """Patch mongomock_ng's collection store and collection (idempotent, this process only)."""
    global _installed
    if _installed:
        return
    import mongomock_ng.collection as mcol
    import mongomock_ng.store as mstore
    from mongomock_ng.filtering import filter_applies
    from pymongo.errors import DuplicateKeyError

    cs = mstore.CollectionStore
    orig_init, orig_set, orig_del, orig_drop = cs.__init__, cs.__setitem__, cs.__delitem__, cs.drop

    def __init__(self: Any, name: str) -> None:
        orig_init(self, name)
        self._wp_index = _Index()

    def __setitem__(self: Any, key: Any, val: Any) -> None:
        orig_set(self, key, val)
        self._wp_index.put(key, val)

    def __delitem__(self: Any, key: Any) -> None:
        orig_del(self, key)
        self._wp_index.drop(key)

    def drop(self: Any) -> None:
        orig_drop(self)
        self._wp_index = _Index()

    cs.__init__, cs.__setitem__, cs.__delitem__, cs.drop = __init__, __setitem__, __delitem__, drop

    col = mcol.Collection
    orig_iter, orig_uniques = col._iter_documents, col._ensure_uniques

    def _iter_documents(self: Any, spec: Any) -> Iterator[dict[str, Any]]:
        store = self._store
        ids = store._wp_index.candidates(spec)
        if ids is None or store._ttl_indexes:
            return orig_iter(self, spec)
        docs = store._documents
        picked = [docs[i] for i in ids if i in docs]
        return (d for d in picked if filter_applies(spec, d))

    def _ensure_uniques(self: Any, new_data: dict[str, Any]) -> None:
        store = self._store
        for index in store.indexes.values():
            if not index.get("unique"):
                continue
            keys = [k for k, _ in index.get("key")]
            if (
                index.get("sparse")
                or index.get("partialFilterExpression")
                or any(k not in INDEXED_FIELDS for k in keys[:1])
            ):
                return orig_uniques(self, new_data)
            spec = {k: new_data.get(k) for k in keys}
            ids = store._wp_index.candidates({keys[0]: spec[keys[0]]})
            if ids is None:
                return orig_uniques(self, new_data)
            for i in ids:
                if i == new_data.get("_id"):
                    continue
                doc = store._documents.get(i)
                if doc is not None and all(doc.get(k) == spec[k] for k in keys):
                    raise DuplicateKeyError(
                        "E11000 Duplicate Key Error",
                        11000,
                        {"keyPattern": dict(index.get("key")), "keyValue": spec},
                    )
        return None

    col._iter_documents, col._ensure_uniques = _iter_documents, _ensure_uniques
    _installed = True
