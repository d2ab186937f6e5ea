"""A worker's side of the messages to the scheduler, without a node: its key seals heartbeats,
authorization requests and status reports exactly as a worker node's messenger does, for a
test or a benchmark to hand to the scheduler's inbox (``scheduler.inbox``)."""

from __future__ import annotations

from typing import Any

from pool.messages import (
    AUTHORIZE,
    HEARTBEAT,
    REPORT,
    AuthorizeRequest,
    Domain,
    Heartbeat,
    MessageSigner,
    ReplicateReport,
)
from pool.states import ReplicateStatus


class SigningWorker:
    def __init__(self, private_key: str | bytes, domain: Domain, name: str = "test") -> None:
        self.signer = MessageSigner(private_key, domain)
        self.address = self.signer.address
        self.name = name

    def heartbeat(
        self, slots: int = 2, capabilities: tuple[str, ...] = ("standard",), busy: int = 0
    ) -> dict[str, Any]:
        beat = Heartbeat(self.address, self.name, capabilities, slots, busy, "test")
        return self.signer.seal(HEARTBEAT, beat)

    def authorize(self, taskid: str) -> dict[str, Any]:
        return self.signer.seal(AUTHORIZE, AuthorizeRequest(taskid, self.address))

    def report(self, taskid: str, status: str | ReplicateStatus, **fields: Any) -> dict[str, Any]:
        report = ReplicateReport(taskid, self.address, ReplicateStatus(status), **fields)
        return self.signer.seal(REPORT, report)
