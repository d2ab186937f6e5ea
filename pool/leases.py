"""The one lease of the project: a Redis key held with a random token and an expiry.

Taken with ``SET NX PX``; renewed and released by compare-and-expire / compare-and-delete
scripts, so only the holder's token can extend or free it, and a holder that dies frees it
when the expiry passes. The scheduler's tick lock and a worker node's mnemonic index are
both leases.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
)
_RELEASE = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
)


@dataclass
class Lease:
    redis: Any
    key: str
    ttl_ms: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def acquire(cls, redis: Any, key: str, ttl_ms: int) -> Lease | None:
        """The lease of ``key``, or None when someone else holds it."""
        lease = cls(redis, key, ttl_ms)
        return lease if lease.take() else None

    def take(self) -> bool:
        """Take the key if it is free (``SET NX PX``) with this lease's token."""
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Push the expiry back; False when the key is no longer ours (expired, taken)."""
        return bool(int(self.redis.eval(_RENEW, 1, self.key, self.token, self.ttl_ms)))

    def release(self) -> None:
        """Free the key if it is still ours."""
        self.redis.eval(_RELEASE, 1, self.key, self.token)
