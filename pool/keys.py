"""Every Redis key the services share, in one place (the Celery queues are in
:mod:`pool.messages`).

* ``workerpool:scheduler:tick`` — the tick lock: one tick at a time across schedulers;
* ``workerpool:node-seen:<address>`` — time of a node's last heartbeat by Redis's clock
  (the scheduler judges a node LOST on it);
* ``workerpool:node-alive:<address>`` — present while a node lives (expires after three
  heartbeat periods, never sooner than WORKER_LOST_TIMEOUT): peers remove the app
  containers of a node whose key expired;
* ``workerpool:worker-index:<i>`` — the lease of mnemonic derivation index ``i``.
"""

from __future__ import annotations

TICK_LOCK = "workerpool:scheduler:tick"
SEEN_PREFIX = "workerpool:node-seen:"
ALIVE_PREFIX = "workerpool:node-alive:"
INDEX_PREFIX = "workerpool:worker-index:"


def node_seen(address: str) -> str:
    return f"{SEEN_PREFIX}{address.lower()}"


def node_alive(address: str) -> str:
    return f"{ALIVE_PREFIX}{address.lower()}"


def worker_index(index: int) -> str:
    return f"{INDEX_PREFIX}{index}"
