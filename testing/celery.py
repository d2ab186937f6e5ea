"""A Celery app that sends nothing: it keeps what it was asked to send, for a test or a fake
worker to read back (``messages``) and to count (``sent``, by task name)."""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

from pool.messages import Messenger


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


def fake_messenger() -> tuple[Messenger, FakeCelery]:
    """A :class:`~pool.messages.Messenger` on a :class:`FakeCelery`, and that fake."""
    celery = FakeCelery()
    return Messenger(celery), celery
