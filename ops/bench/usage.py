"""Chain usage of a benchmark process, without a proxy in front of the node.

Every :class:`poco.chain.ChainClient` counts the requests it sends by JSON-RPC method and
the transactions it sends by PoCo function (``ChainClient.usage()``). In the processes the
benchmark starts (workers: ``patches/sitecustomize.py`` calls :func:`install` when
``WORKERPOOL_BENCH_USAGE_FILE`` is set), the clients the process makes are remembered and
their summed usage is written to that file (``{pid}`` replaced) every 0.2 s, for the driver
to read. Counting this way costs a counter increment per request, where a proxy costs a
process and an HTTP hop per request on the same cores as the pool.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DUMP_PERIOD = 0.2


def total(usages: Iterable[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    calls: Counter[str] = Counter()
    transactions: Counter[str] = Counter()
    for usage in usages:
        calls.update(usage.get("calls", {}))
        transactions.update(usage.get("transactions", {}))
    return {"calls": dict(calls), "transactions": dict(transactions)}


def install(pattern: str) -> None:
    from poco import chain

    clients: list[Any] = []  # kept alive: a client dropped by the code still counted
    original = chain.ChainClient.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        clients.append(self)

    chain.ChainClient.__init__ = init  # type: ignore[method-assign]
    path = Path(pattern.format(pid=os.getpid()))
    path.parent.mkdir(parents=True, exist_ok=True)

    def dump() -> None:
        while True:
            data = total(c.usage() for c in list(clients))
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
            time.sleep(DUMP_PERIOD)

    threading.Thread(target=dump, daemon=True, name="bench-usage").start()


def read(directory: Path, prefix: str) -> dict[str, dict[str, int]]:
    """The summed usage of the files ``prefix*.json`` in ``directory``."""
    usages = []
    for f in sorted(directory.glob(f"{prefix}*.json")):
        try:
            usages.append(json.loads(f.read_text()))
        except (OSError, ValueError):  # being replaced: the next dump will do
            continue
    return total(usages)
