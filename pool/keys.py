"""Every Redis key the services share, in one place (the Celery queues are in
:mod:`pool.messages`).

* ``workerpool:scheduler:tick`` — the tick lock: one tick at a time across schedulers;
* ``workerpool:node-seen:<address>`` — a node's last heartbeat, the signed envelope it sent
  (the scheduler judges a node LOST on the time it was issued, once its signature verified);
* ``workerpool:node-alive:<address>`` — present while a node lives (expires after three
  heartbeat periods): peers remove the app containers of a node whose key expired;
* ``workerpool:worker-index:<i>`` — the lease of mnemonic derivation index ``i``;
* ``workerpool:msg-nonce:<address>:<nonce>`` — the nonce of a worker's signed message the
  scheduler took (a replay is refused), kept as long as the message could be accepted;
* ``workerpool:messages-refused`` — a hash: worker messages refused, by ``message|reason``.
"""

from __future__ import annotations

TICK_LOCK = "workerpool:scheduler:tick"
SEEN_PREFIX = "workerpool:node-seen:"
ALIVE_PREFIX = "workerpool:node-alive:"
INDEX_PREFIX = "workerpool:worker-index:"
NONCE_PREFIX = "workerpool:msg-nonce:"
MESSAGES_REFUSED = "workerpool:messages-refused"


def node_seen(address: str) -> str:
    return f"{SEEN_PREFIX}{address.lower()}"


def node_alive(address: str) -> str:
    return f"{ALIVE_PREFIX}{address.lower()}"


def worker_index(index: int) -> str:
    return f"{INDEX_PREFIX}{index}"


def message_nonce(address: str, nonce: str) -> str:
    return f"{NONCE_PREFIX}{address.lower()}:{nonce.lower()}"
