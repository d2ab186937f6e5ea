"""mongomock with indexes, for the scheduler-scale benchmark and the cost tests.

mongomock answers every query by scanning the whole collection (and checks unique indexes by
scanning it again on every write), so on mongomock one status change costs O(tasks): 0.25 s
per transition at 20,000 tasks. A real MongoDB serves the store's queries from its indexes
(``Store.ensure_indexes``). To measure the *scheduler* at 10,000 and 100,000 tasks rather
than mongomock's scans, :func:`install` patches mongomock (in this process, until
:func:`uninstall`) with

* hash indexes on the fields the store queries by equality or ``$in``;
* the store's compound indexes, kept sorted: a query with equalities (or ``$in``) on the
  first fields of one and a range on its last field reads only the keys in that range, and a
  query sorted on the fields that follow its equalities is read in the index's order, up to
  the cursor's limit (as MongoDB's index scans do: a page costs its size, not the
  collection's);

every candidate document is still checked with mongomock's own ``filter_applies``, so results
are exactly mongomock's.

What stays the same as on a real MongoDB: a query that returns k documents costs O(k), a
query that filters on a non-indexed field only costs O(matches of the indexed part). What
differs: a plain query planner (the index with the fewest candidate keys wins), documents are
deep-copied on the way out (as pymongo decodes BSON), and a compound index holds only the
documents that have every one of its fields (the store's range queries never match the
others).
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
from collections.abc import Hashable, Iterable, Iterator
from typing import Any

from sortedcontainers import SortedList

INDEXED_FIELDS = ("chainTaskId", "chainDealId", "status", "worker", "address", "name")
_MISSING = object()
_installed: dict[str, Any] = {}
# above every part of a key (the type ranks and the insertion number it is compared with)
_TOP = float("inf")
_RANGE_OPS = {"$lt", "$lte", "$gt", "$gte"}
_PATCH = "patch_datetime_awareness_in_document"  # (mongomock's: datetimes as it stores them)


def _value(doc: dict[str, Any], field: str) -> Any:
    value = doc.get(field)
    return value if isinstance(value, Hashable) else _MISSING


def _rank(value: Any) -> int | None:
    """MongoDB's order of types (null < numbers < strings < booleans < dates), for the
    types the store keeps; None: a value this index does not order (then not indexed)."""
    if value is None:
        return 1
    if isinstance(value, bool):
        return 8
    if isinstance(value, int | float):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, dt.datetime):
        return 9
    return None


class _Ordered:
    """One compound index: the keys ``(rank0, value0, rank1, value1, ..., seq)`` of the
    documents that have every field, kept sorted (which key a document has is kept by
    :class:`_Index`)."""

    def __init__(self, fields: tuple[str, ...], ids: list[Any]) -> None:
        self.fields = fields
        self.keys: SortedList = SortedList()
        self.ids = ids  # seq -> document id, shared by the collection's indexes

    def key(self, doc: dict[str, Any], seq: int) -> tuple[Any, ...] | None:
        key: list[Any] = []
        for field in self.fields:
            value = doc.get(field)
            rank = _rank(value)
            if value is None or rank is None:
                return None
            key += (rank, value)
        key.append(seq)
        return tuple(key)

    def move(self, old: tuple[Any, ...] | None, new: tuple[Any, ...] | None) -> None:
        if old == new:
            return
        if old is not None:
            self.keys.remove(old)
        if new is not None:
            self.keys.add(new)

    def plan(
        self, spec: dict[str, Any], sort: list[tuple[str, int]] | None, documents: int
    ) -> tuple[int, Iterator[Any]] | None:
        """(how many keys it reads, the ids it yields) for ``spec``, or None when it cannot
        serve it: equalities on the first fields, then a range on the next one, or a sort
        on the fields after the equalities (ascending, in this index's order)."""
        combos: list[tuple[Any, ...]] = [()]
        j = 0
        for field in self.fields:
            values = _equal_values(spec.get(field, _MISSING))
            if values is None:
                break
            combos = [(*prefix, *value) for prefix in combos for value in values]
            j += 1
        complete = len(self.keys) == documents
        bounds = None
        # a range on the field after the equalities: on the last field, or on any when every
        # document is in the index (one that lacks a later field could match)
        if j == len(self.fields) - 1 or (j < len(self.fields) and complete):
            bounds = _range(spec.get(self.fields[j], _MISSING))
        ordered = False
        if sort:
            # ascending only: mongomock keeps ties in their natural order in both directions
            names = [name for name, _ in sort]
            ascending = all(direction == 1 for _, direction in sort)
            ordered = names == list(self.fields[j : j + len(names)]) and ascending
            # every document must be in the index to read a sort from it
            ordered = ordered and (bounds is not None or complete)
        if (bounds is None or sort) and not ordered:
            return None  # (a sort this index cannot serve: mongomock sorts the candidates)
        ranges = [self._bounds(prefix, bounds) for prefix in combos]
        count = sum(self._count(*r) for r in ranges)
        streams = [self.keys.irange(lo, hi, inclusive) for lo, hi, inclusive in ranges]
        if ordered and len(streams) > 1:
            keys: Iterable[tuple[Any, ...]] = heapq.merge(*streams, key=lambda k: k[2 * j :])
        else:
            keys = itertools.chain.from_iterable(streams)
            if not ordered:  # natural order, as mongomock answers
                keys = sorted(keys, key=lambda k: k[-1])
        ids = self.ids
        return count, (ids[k[-1]] for k in keys)

    def _bounds(
        self, prefix: tuple[Any, ...], bounds: tuple[Any, bool, Any, bool] | None
    ) -> tuple[tuple[Any, ...], tuple[Any, ...], tuple[bool, bool]]:
        if bounds is None:
            return prefix, (*prefix, _TOP), (True, True)
        lo, lo_in, hi, hi_in = bounds
        low = (*prefix, *lo) if lo_in or len(lo) == 1 else (*prefix, *lo, _TOP)
        high = (*prefix, *hi, _TOP) if hi_in and len(hi) == 2 else (*prefix, *hi)
        return low, high, (True, hi_in and len(hi) == 2)

    def _count(self, lo: tuple[Any, ...], hi: tuple[Any, ...], inclusive: tuple[bool, bool]) -> int:
        start = self.keys.bisect_left(lo)
        end = self.keys.bisect_right(hi) if inclusive[1] else self.keys.bisect_left(hi)
        return max(0, end - start)


def _equal_values(cond: Any) -> list[tuple[Any, Any]] | None:
    """The encoded values an equality or ``$in`` allows (None: not one of those)."""
    if cond is _MISSING:
        return None
    if isinstance(cond, dict):
        if set(cond) != {"$in"} or not isinstance(cond["$in"], list | tuple):
            return None
        values = list(cond["$in"])
    else:
        values = [cond]
    encoded = []
    for value in values:
        rank = _rank(value)
        if rank is None or value is None:
            return None
        encoded.append((rank, value))
    return encoded


def _range(cond: Any) -> tuple[Any, bool, Any, bool] | None:
    """A range condition's bounds (within the type of its values, as MongoDB brackets types):
    (low, low inclusive, high, high inclusive), each bound ``(rank, value)`` or ``(rank,)``
    / ``(rank + 0.5,)`` for the start / end of the type."""
    if not isinstance(cond, dict) or not cond or not set(cond) <= _RANGE_OPS:
        return None
    ranks = {_rank(v) for v in cond.values()}
    if len(ranks) != 1 or None in ranks or 1 in ranks:
        return None
    (rank,) = ranks
    assert rank is not None
    lo: tuple[Any, ...] = (rank,)
    hi: tuple[Any, ...] = (rank + 0.5,)
    lo_in = hi_in = True
    for op, value in cond.items():
        if op in ("$gt", "$gte"):
            lo, lo_in = (rank, value), op == "$gte"
        else:
            hi, hi_in = (rank, value), op == "$lte"
    return lo, lo_in, hi, hi_in


class _Index:
    """The collection's hash indexes (field -> value -> the ids holding it: one id, or a list
    or a dict of them in insertion order) and its compound indexes, sorted (:class:`_Ordered`); per
    document only its insertion number. What a document was filed under is computed when it
    changes: from the document it replaces, or, for a document an update changes in place,
    from the copy mongomock takes of it before changing it (:attr:`original`). (Kept small: a
    benchmark's peak memory includes it, as a real MongoDB's memory includes its indexes.)"""

    def __init__(self) -> None:
        self.fwd: dict[str, dict[Any, Any]] = {f: {} for f in INDEXED_FIELDS}
        self.unindexable: dict[Any, None] = {}
        self.seqs: dict[Any, int] = {}  # id -> insertion number
        # insertion number -> id (None: deleted; a list grows by one slot per insert ever,
        # which a test or a benchmark can afford)
        self.ids: list[Any] = [None]
        self.counter = 0
        self.ordered: list[_Ordered] = []
        self.declared = 0  # indexes of the collection seen by sync
        # (id, copy) of the document an update is changing in place, as it was before
        self.original: tuple[Any, dict[str, Any]] | None = None

    def filing(self, doc: dict[str, Any], seq: int) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        """What ``doc`` is filed under: its hash values (by INDEXED_FIELDS, None: not filed)
        and its compound keys (by index, None: not in it)."""
        values = []
        for field in INDEXED_FIELDS:
            value = _value(doc, field)
            values.append(None if value is _MISSING else value)
        return tuple(values), tuple(index.key(doc, seq) for index in self.ordered)

    def put(self, key: Any, doc: dict[str, Any], old: dict[str, Any] | None) -> None:
        """File ``doc`` under ``key``; ``old``: the document it replaces (None: new)."""
        seq = self.seqs.get(key)
        if seq is None:
            self.counter += 1
            seq = self.seqs[key] = self.counter
            self.ids.append(key)
            was: tuple[tuple[Any, ...], tuple[Any, ...]] | None = (
                (None,) * len(INDEXED_FIELDS),
                (None,) * len(self.ordered),
            )
        else:
            was = None
            if old is not None and old is not doc:
                was = self.filing(old, seq)
            elif self.original is not None and self.original[0] == key:
                was = self.filing(self.original[1], seq)
            self.original = None
        if was is None:  # changed in place out of an update's sight: looked for everywhere
            self._unfile_everywhere(key, seq)
            was = ((None,) * len(INDEXED_FIELDS), (None,) * len(self.ordered))
        filed, keys = was
        values, new_keys = self.filing(doc, seq)
        self.unindexable.pop(key, None)
        for field, old_value, new in zip(INDEXED_FIELDS, filed, values, strict=True):
            if _value(doc, field) is _MISSING:
                self.unindexable[key] = None
            changed = old_value != new or type(old_value) is not type(new)
            if old_value is not None and changed:
                self._unfile(field, old_value, key)
            if new is not None and changed:
                self._file(field, new, key)
        for index, old_key, new_key in zip(self.ordered, keys, new_keys, strict=True):
            index.move(old_key, new_key)

    def drop(self, key: Any, old: dict[str, Any] | None) -> None:
        seq = self.seqs.pop(key, None)
        if seq is None:
            return
        if old is None:
            self._unfile_everywhere(key, seq)
        else:
            filed, keys = self.filing(old, seq)
            for field, value in zip(INDEXED_FIELDS, filed, strict=True):
                if value is not None:
                    self._unfile(field, value, key)
            for index, old_key in zip(self.ordered, keys, strict=True):
                index.move(old_key, None)
        self.unindexable.pop(key, None)
        self.ids[seq] = None

    def _unfile_everywhere(self, key: Any, seq: int) -> None:
        """Take ``key`` out of every index without knowing what it was filed under (a scan of
        the indexes: for a document changed in place where no update saw it, never on the
        store's own paths)."""
        for field, buckets in self.fwd.items():
            held_by = [
                value
                for value, held in buckets.items()
                if (key in held if isinstance(held, dict | list) else held == key)
            ]
            for value in held_by:
                self._unfile(field, value, key)
        for index in self.ordered:
            for stale in [k for k in index.keys if k[-1] == seq]:
                index.keys.remove(stale)

    def _file(self, field: str, value: Any, key: Any) -> None:
        buckets = self.fwd[field]
        held = buckets.get(value, _MISSING)
        if held is _MISSING:
            buckets[value] = key
        elif isinstance(held, dict):
            held[key] = None
        elif isinstance(held, list):
            held.append(key)
        elif held != key:
            buckets[value] = [held, key]

    def _unfile(self, field: str, value: Any, key: Any) -> None:
        buckets = self.fwd[field]
        held = buckets.get(value, _MISSING)
        if isinstance(held, list):
            # a bucket is a list (8 bytes an id) while it only grows; a dict from its first
            # removal on (the ids of a deal never leave its bucket, those of a status do)
            held = buckets[value] = dict.fromkeys(held)
        if isinstance(held, dict):
            held.pop(key, None)
        elif held is not _MISSING and held == key:
            del buckets[value]

    def _bucket(self, field: str, value: Any) -> list[Any]:
        held = self.fwd[field].get(value, _MISSING)
        if held is _MISSING:
            return []
        return list(held) if isinstance(held, dict | list) else [held]

    def sync(self, indexes: dict[str, Any], documents: dict[Any, dict[str, Any]]) -> None:
        """Build the compound indexes declared since the last look (from the documents)."""
        if len(indexes) == self.declared:
            return
        self.declared = len(indexes)
        known = {index.fields for index in self.ordered}
        for spec in indexes.values():
            fields = tuple(name for name, _ in spec.get("key", []))
            if len(fields) < 2 or fields in known:
                continue
            index = _Ordered(fields, self.ids)
            known.add(fields)
            for doc_id, doc in documents.items():
                seq = self.seqs.get(doc_id)
                if seq is not None:
                    index.move(None, index.key(doc, seq))
            self.ordered.append(index)

    def candidates(self, spec: Any) -> list[Any] | None:
        """Ids that may match ``spec`` (a superset), in insertion order; None: scan all."""
        if not isinstance(spec, dict):
            return None
        if (
            "_id" in spec
            and isinstance(spec["_id"], Hashable)
            and not isinstance(spec["_id"], dict)
        ):
            return [spec["_id"]] if spec["_id"] in self.seqs else []
        best: list[Any] | None = None
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
            # (a document without the field, or with None, is filed under nothing)
            if not all(isinstance(v, Hashable) and v is not None for v in values):
                continue
            found = [i for v in values for i in self._bucket(field, v)]
            if best is None or len(found) < len(best):
                best = found
        ranged = None if best is not None and len(best) <= 1 else self._best_ordered(spec, None)
        if ranged is not None and (best is None or ranged[0] < len(best)):
            return list(ranged[1])
        if best is None:
            return None
        found_ids = dict.fromkeys(best)
        found_ids.update(self.unindexable)
        seqs = self.seqs
        return sorted(found_ids, key=lambda k: seqs.get(k, 0))

    def rest_of(self, spec: dict[str, Any]) -> tuple[str, set[str], dict[str, Any]] | None:
        """For a ``$in`` of strings on a hash-indexed field: that field, its values and the
        rest of the query (None: nothing to split)."""
        for field in INDEXED_FIELDS:
            cond = spec.get(field)
            if (
                isinstance(cond, dict)
                and set(cond) == {"$in"}
                and isinstance(cond["$in"], list | tuple)
                and len(cond["$in"]) > 8
                and all(type(v) is str for v in cond["$in"])
            ):
                return field, set(cond["$in"]), {k: v for k, v in spec.items() if k != field}
        return None

    def in_order(self, spec: Any, sort: list[tuple[str, int]]) -> Iterator[Any] | None:
        """The ids of the documents that may match ``spec``, in the order of ``sort``, read
        from a compound index (lazily: a limit stops the read); None: no index serves it."""
        if not isinstance(spec, dict) or self.unindexable:
            return None
        found = self._best_ordered(spec, sort)
        return None if found is None else found[1]

    def _best_ordered(
        self, spec: dict[str, Any], sort: list[tuple[str, int]] | None
    ) -> tuple[int, Iterator[Any]] | None:
        best: tuple[int, Iterator[Any]] | None = None
        for index in self.ordered:
            found = index.plan(spec, sort, len(self.seqs))
            if found is not None and (best is None or found[0] < best[0]):
                best = found
        return best


def _sort_list(sort: Any) -> list[tuple[str, int]] | None:
    if not sort:
        return None
    items = sort.items() if isinstance(sort, dict) else sort
    normalized = []
    for item in items:
        name, direction = (item, 1) if isinstance(item, str) else item
        if not isinstance(name, str) or name.startswith("$") or direction not in (1, -1):
            return None
        normalized.append((name, direction))
    return normalized


def install() -> None:
    """Patch mongomock_ng's collection store, collection and cursor (idempotent, this
    process only, until :func:`uninstall`)."""
    if _installed:
        return
    import mongomock_ng.collection as mcol
    import mongomock_ng.helpers as mhelpers
    import mongomock_ng.store as mstore
    from mongomock_ng.filtering import filter_applies
    from pymongo.errors import DuplicateKeyError

    cs = mstore.CollectionStore
    col = mcol.Collection
    cursor = mcol.Cursor
    _installed.update(
        {
            "cs": (
                cs,
                {n: getattr(cs, n) for n in ("__init__", "__setitem__", "__delitem__", "drop")},
            ),
            "col": (
                col,
                {
                    n: getattr(col, n)
                    for n in (
                        "_iter_documents",
                        "_ensure_uniques",
                        "_get_dataset",
                        "_update_documents",
                    )
                },
            ),
            "cursor": (cursor, {"_compute_results": cursor._compute_results}),
            "module": (mcol, {"_clone_document": mcol._clone_document}),
            "helpers": (mhelpers, {_PATCH: getattr(mhelpers, _PATCH)}),
        }
    )
    orig_init, orig_set, orig_del, orig_drop = (
        cs.__init__,
        cs.__setitem__,
        cs.__delitem__,
        cs.drop,
    )

    def __init__(self: Any, name: str) -> None:
        orig_init(self, name)
        # a dict keeps the insertion order as mongomock's OrderedDict does, in half its memory
        self._documents = {}
        self._wp_index = _Index()

    def _index(self: Any) -> _Index:
        index = getattr(self, "_wp_index", None)
        if index is None:  # a store made before install
            index = self._wp_index = _Index()
            for key, doc in self._documents.items():
                index.put(key, doc, None)
        index.sync(self.indexes, self._documents)
        return index

    def __setitem__(self: Any, key: Any, val: Any) -> None:
        old = self._documents.get(key)
        orig_set(self, key, val)
        _index(self).put(key, val, old)

    def __delitem__(self: Any, key: Any) -> None:
        old = self._documents.get(key)
        orig_del(self, key)
        _index(self).drop(key, old)

    def drop(self: Any) -> None:
        orig_drop(self)
        self._documents = {}
        self._wp_index = _Index()

    for name, patched in (
        ("__init__", __init__),
        ("__setitem__", __setitem__),
        ("__delitem__", __delitem__),
        ("drop", drop),
    ):
        setattr(cs, name, patched)

    orig_iter, orig_uniques, orig_dataset, orig_update = (
        col._iter_documents,
        col._ensure_uniques,
        col._get_dataset,
        col._update_documents,
    )
    orig_clone = mcol._clone_document

    # mongomock's update copies each document it reads (to restore it if the update fails),
    # then changes the stored document in place and stores it again: the copy tells its
    # index what the document was filed under (see _Index.put)
    updating: list[Any] = []

    def _update_documents(self: Any, *args: Any, **kwargs: Any) -> Any:
        store = self._store
        updating.append(store)
        try:
            return orig_update(self, *args, **kwargs)
        finally:
            updating.pop()
            index = getattr(store, "_wp_index", None)
            if index is not None:
                index.original = None

    def _clone_document(doc: Any) -> Any:
        copied = orig_clone(doc)
        if updating and isinstance(doc, dict):
            store = updating[-1]
            key = doc.get("_id")
            if isinstance(key, Hashable) and store._documents.get(key) is doc:
                _index(store).original = (key, copied)
        return copied

    def _iter_documents(self: Any, spec: Any) -> Iterator[dict[str, Any]]:
        store = self._store
        index = _index(store)
        ids = index.candidates(spec)
        if ids is None or store._ttl_indexes:
            return orig_iter(self, spec)
        docs = store._documents
        picked = [docs[i] for i in ids if i in docs]
        # a string ``$in`` on a hash-indexed field its bucket answered exactly is not checked
        # again (mongomock checks ``$in`` by scanning the list: quadratic for a batch)
        rest = index.rest_of(spec)
        if rest is None:
            return (d for d in picked if filter_applies(spec, d))
        field, values, others = rest

        def applies(doc: dict[str, Any]) -> bool:
            value = doc.get(field)
            if type(value) is not str:
                return bool(filter_applies(spec, doc))
            return value in values and bool(filter_applies(others, doc))

        return (d for d in picked if applies(d))

    def _get_dataset(self: Any, spec: Any, sort: Any, fields: Any, as_class: Any) -> Any:
        store = self._store
        order = _sort_list(sort)
        ids = None
        if order and not store._ttl_indexes:
            ids = _index(store).in_order(spec, order)
        if ids is None:
            yield from orig_dataset(self, spec, sort, fields, as_class)
            return
        docs = store._documents
        for doc_id in ids:
            doc = docs.get(doc_id)
            if doc is None or not filter_applies(spec, doc):
                continue
            result = self._copy_only_fields(doc, fields, as_class, filter=spec)
            if result is not None:
                yield result

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
            ids = _index(store).candidates({keys[0]: spec[keys[0]]})
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

    patches: tuple[tuple[str, Any], ...] = (
        ("_iter_documents", _iter_documents),
        ("_ensure_uniques", _ensure_uniques),
        ("_get_dataset", _get_dataset),
        ("_update_documents", _update_documents),
    )
    for name, patched in patches:
        setattr(col, name, patched)

    orig_compute = cursor._compute_results

    def _compute_results(self: Any, with_limit_and_skip: bool = False) -> Any:
        # a limit stops the read (as a MongoDB cursor does), instead of reading every match
        limit = self._limit
        if (
            not with_limit_and_skip
            or not limit
            or limit < 0
            or self.collection.codec_options.tz_aware
        ):
            return orig_compute(self, with_limit_and_skip)
        cached = getattr(self, "_wp_limited", None)
        if cached is None or cached[0] is not self._factory:
            results = list(itertools.islice(self._factory(), self._skip + limit))
            cached = self._wp_limited = (self._factory, results)
        return cached[1][self._skip :]

    for name, patched in (("_compute_results", _compute_results),):
        setattr(cursor, name, patched)
    mcol._clone_document = _clone_document

    orig_patch = mhelpers.patch_datetime_awareness_in_document

    def patch_datetime_awareness_in_document(value: Any) -> Any:
        # mongomock makes a copy of every datetime it stores, truncated to milliseconds; one
        # that is already naive and in milliseconds is kept as it is (a datetime does not
        # change: the same answers, without a copy per document of a time a batch shares)
        if type(value) is dt.datetime and value.tzinfo is None and not value.microsecond % 1000:
            return value
        return orig_patch(value)

    mhelpers.patch_datetime_awareness_in_document = patch_datetime_awareness_in_document


def uninstall() -> None:
    """Undo :func:`install` (stores made meanwhile keep their indexes, unused)."""
    for cls, originals in _installed.values():
        for name, value in originals.items():
            setattr(cls, name, value)
    _installed.clear()
