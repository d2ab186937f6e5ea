"""A Celery app that sends nothing: it keeps what it was asked to send, for a test or a fake
worker to read back (``messages``) and to count (``sent``, by task name)."""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

from pool.messages import Domain, MessageSigner, Messenger
from testing.chain import POOL

# the domain of the fakes' signed messages (testing.chain.FakeChain's chain id and pool)
FAKE_DOMAIN = Domain(65535, POOL)


class Sent(NamedTuple):
    name: str
    args: list[Any]
    queue: str


class FakeCelery:
    def __init__(self) -> None:
        self.messages: collections.deque[Sent] = collections.deque()
        self.sent: collections.Counter[str] = collections.Counter()

    def send_task(
        self, name: str, args: Any = None, kwargs: Any = None, queue: str = "", **_: Any
    ) -> None:
        self.sent[name] += 1
        self.messages.append(Sent(name, list(args or []), queue))

    def of(self, name: str) -> list[Sent]:
        """The messages sent under task ``name``, oldest first."""
        return [m for m in self.messages if m.name == name]


def fake_messenger(
    private_key: str | None = None, domain: Domain = FAKE_DOMAIN
) -> tuple[Messenger, FakeCelery]:
    """A :class:`~pool.messages.Messenger` on a :class:`FakeCelery` (signing as a worker with
    ``private_key`` when given), and that fake."""
    celery = FakeCelery()
    signer = None if private_key is None else MessageSigner(private_key, domain)
    return Messenger(celery, signer), celery
