"""Who a worker node is: a keystore, a raw devnet key, or a mnemonic index leased in Redis.

Scaled nodes (``docker compose up --scale worker=N``) share one mnemonic. Each node leases a
free derivation index (a :class:`pool.leases.Lease` on ``workerpool:worker-index:<i>``) and
renews it with every heartbeat; only the holder's token can renew it, so two live nodes never
share an index, and an index whose node died frees itself after the lease time for a
restarted node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account import Account

from pool import keys
from pool.leases import Lease
from pool.settings import Settings, SettingsError
from pool.wallets import worker_key

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another node holds our index now: this node must stop using the identity."""


@dataclass
class IndexLease:
    """The lease of one mnemonic derivation index (:class:`pool.leases.Lease`)."""

    index: int
    lease: Lease

    @property
    def key(self) -> str:
        return self.lease.key

    def renew(self) -> None:
        if self.lease.renew():
            return
        # expired (e.g. Redis restarted or a long pause): take it back if still free
        if self.lease.take():
            log.warning("worker index %d lease had expired; re-acquired", self.index)
            return
        raise LeaseLost(f"worker index {self.index} is now held by another node")

    def release(self) -> None:
        self.lease.release()


def liveness_ttl(settings: Settings) -> float:
    """Seconds a node's liveness (its alive key, its index lease) outlasts its last
    heartbeat: three heartbeats, and never less than WORKER_LOST_TIMEOUT, so that a silent
    node's index and containers are not given away while the pool still counts on it (a
    cut link: its work may come back)."""
    return max(3 * settings.heartbeat_period, settings.worker_lost_timeout)


def lease_index(redis: Any, first: int, count: int, ttl_ms: int) -> IndexLease:
    """Lease the lowest free index in [first, first + count)."""
    for index in range(first, first + count):
        lease = Lease.acquire(redis, keys.worker_index(index), ttl_ms)
        if lease is not None:
            return IndexLease(index, lease)
    raise SettingsError(
        f"no free worker index in [{first}, {first + count}): raise WORKERPOOL_WORKER_INDEX_COUNT"
    )


def derive(mnemonic: str, index: int) -> str:
    Account.enable_unaudited_hdwallet_features()
    acct = Account.from_mnemonic(mnemonic, account_path=f"m/44'/60'/0'/0/{index}")
    return "0x" + bytes(acct.key).hex()


def mnemonic_of(settings: Settings) -> str:
    if settings.worker_mnemonic_file:
        try:
            return Path(settings.worker_mnemonic_file).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"IEXEC_WORKER_MNEMONIC_FILE: {exc}") from exc
    return settings.worker_mnemonic.strip()


def resolve(settings: Settings, redis: Any) -> tuple[str, IndexLease | None]:
    """The node's private key, and its index lease when the key comes from a mnemonic."""
    mnemonic = mnemonic_of(settings)
    if mnemonic and not (settings.worker_wallet_path or settings.worker_wallet_private_key):
        ttl_ms = int(liveness_ttl(settings) * 1000)
        lease = lease_index(redis, settings.worker_index_first, settings.worker_index_count, ttl_ms)
        try:
            key = derive(mnemonic, lease.index)
        except Exception as exc:
            lease.release()
            raise SettingsError(f"IEXEC_WORKER_MNEMONIC: cannot derive a key ({exc})") from exc
        log.info("leased worker index %d", lease.index)
        return key, lease
    return worker_key(settings), None
