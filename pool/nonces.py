"""The next nonce of a wallet several processes send with, kept in Redis.

Every scheduler process (``workerpool scheduler --no-beat`` consumers beside the beat, the
replenish policy, a restarted container) signs with the one scheduler wallet. Each process
has its own nonce counter (:class:`poco.chain.NonceManager`); without a shared one, two of
them take the same nonce and the node refuses one ("nonce too low", "replacement transaction
underpriced"). :class:`RedisNonces` is the :class:`poco.chain.SharedNonces` the chain client is
given (:func:`pool.wallets.chain_client` with a Redis client): a lease
(``keys.nonce_lock``, :mod:`pool.leases`) held while a nonce is taken and its transaction sent,
and the next nonce (``keys.nonce``) stored before the lease is released. The lease expires on
its own when its holder dies, so a killed process blocks the others for ``ttl_ms`` at most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from poco.chain import SharedNonces
from poco.errors import TransportError
from pool import keys
from pool.leases import Lease

log = logging.getLogger(__name__)

LOCK_TTL_MS = 30_000  # a send takes milliseconds; RPC retries take seconds
# an idle counter is forgotten: the next send reads the nonce from the node again (a counter
# left ahead of the chain, by a reset devnet or a dropped transaction, is otherwise repaired
# by the gap filler after WORKERPOOL_TX_REPLACE_AFTER)
COUNTER_TTL = 3600
LOCK_WAIT = 60.0  # seconds a process waits for the lease before the send fails (retryable)
POLL = 0.005


class RedisNonces:
    """:class:`poco.chain.SharedNonces` of one (chain, address) in Redis."""

    def __init__(
        self,
        redis: Any,
        chain_id: int,
        address: str,
        *,
        ttl_ms: int = LOCK_TTL_MS,
        wait: float = LOCK_WAIT,
    ) -> None:
        self.redis = redis
        self.address = address
        self.key = keys.nonce(chain_id, address)
        self.lock_key = keys.nonce_lock(chain_id, address)
        self.ttl_ms = ttl_ms
        self.wait = wait

    @contextmanager
    def hold(self) -> Iterator[object]:
        lease = Lease(self.redis, self.lock_key, self.ttl_ms)
        deadline = time.monotonic() + self.wait
        try:
            while not lease.take():
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"the nonce of {self.address} has been held by another process for "
                        f"more than {self.wait:.0f}s ({self.lock_key} in Redis)"
                    )
                time.sleep(POLL)
        except TransportError:
            raise
        except Exception as exc:  # Redis unreachable: nothing is sent, the caller retries
            raise TransportError(f"the nonce lock of {self.address} (Redis): {exc}") from exc
        try:
            yield lease
        finally:
            with suppress(Exception):  # Redis gone meanwhile: the lease expires on its own
                lease.release()

    def load(self) -> int | None:
        try:
            value = self.redis.get(self.key)
        except Exception as exc:
            raise TransportError(f"the nonce of {self.address} (Redis): {exc}") from exc
        return None if value is None else int(value)

    def store(self, next_nonce: int) -> None:
        """After a send: never raised (the transaction is out); a process that then loads an
        older count is told "nonce too low" by the node and reads the nonce from it."""
        try:
            self.redis.set(self.key, next_nonce, ex=COUNTER_TTL)
        except Exception as exc:
            log.warning("the next nonce of %s not stored in Redis: %s", self.address, exc)


def redis_nonces(redis: Any) -> Callable[[int, str], SharedNonces]:
    """The factory :class:`poco.chain.ChainClient` takes (``shared_nonces=``)."""

    def make(chain_id: int, address: str) -> SharedNonces:
        return RedisNonces(redis, chain_id, address)

    return make
