"""Where the scheduler receives what workers send (``scheduler.authorize``,
``scheduler.replicate_update``, ``scheduler.worker_heartbeat``): each message's signed
envelope is checked before the part that applies it sees anything.

* ``authorize``: the signature of the worker it names; issued within
  WORKERPOOL_MESSAGE_MAX_AGE; its nonce never used; the signer on the allowlist. Then
  :mod:`scheduler.authorization` (a verified heartbeat, the capability, the replicates held
  for its slots, a pause, the deadline, a replicate still needed).
* ``replicate_update``: the signature; issued at most REPORT_MAX_AGE ago (it may wait in
  Redis while the scheduler restarts) and not from the future; its nonce not used (recorded
  once the report is applied or refused for good, so that a retried delivery of the same
  message is no replay). Then :mod:`scheduler.reports` (the signer's own replicate only, its
  claims checked on chain).
* ``heartbeat``: the signature; issued within WORKERPOOL_MESSAGE_MAX_AGE; its nonce never
  used; the signer on the allowlist; its values within their bounds (slots at most
  WORKERPOOL_WORKER_MAX_SLOTS). Then :mod:`scheduler.fleet`.

A refused message is logged with the address it claims, counted in Redis by reason
(``/metrics``: ``workerpool_messages_refused``) and dropped; the pool goes on.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pool.messages import (
    AUTHORIZE,
    BAD_HEARTBEAT,
    BAD_SIGNATURE,
    FUTURE,
    HEARTBEAT,
    NOT_ALLOWED,
    REPLAY,
    REPORT,
    REPORT_MAX_AGE,
    STALE,
    WRONG_SIGNER,
    Authorization,
    Refused,
    Signed,
    check_time,
    heartbeat_problem,
)
from scheduler.authorization import Authorizer
from scheduler.context import SchedulerContext
from scheduler.fleet import Fleet
from scheduler.reports import NotYet, Reports

log = logging.getLogger(__name__)

# what an honest node refused for these should check (its log shows the answer)
_DOMAIN_HINT = " (are the node's POOL_ADDRESS and chain this pool's?)"
HINTS = {
    WRONG_SIGNER: _DOMAIN_HINT,
    BAD_SIGNATURE: _DOMAIN_HINT,
    STALE: " (is the node's clock right?)",
    FUTURE: " (is the node's clock right?)",
}


class Inbox:
    def __init__(
        self, ctx: SchedulerContext, authorizer: Authorizer, reports: Reports, fleet: Fleet
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.authorizer = authorizer
        self.reports = reports
        self.fleet = fleet

    def authorize(self, data: Any) -> Authorization:
        """The answer to a signed authorization request."""
        try:
            signed = AUTHORIZE.open(data, self.ctx.domain)
            self._fresh(signed)
            self._allowed(signed)
            self._claim_nonce(signed, self.settings.message_max_age * 2)
        except Refused as exc:
            self.ctx.refusals.count(AUTHORIZE.name, exc)
            hint = HINTS.get(exc.reason, "")
            return Authorization(granted=False, reason=f"refused: {exc.reason}{hint}", requeue=True)
        return self.authorizer.authorize(signed.payload)

    def report(self, data: Any, *, last_try: bool = True, first_try: bool = False) -> None:
        """Apply a signed status report. Raises :class:`NotYet` when what it claims is not
        confirmed yet (the chain, or a lost worker's heartbeat) and ``last_try`` is False
        (the receiver asks again later); on the last try such a report is refused. On its
        ``first_try`` a report that may skip a failure reported before it waits for it
        (:meth:`scheduler.reports.Reports.apply`)."""
        try:
            signed = REPORT.open(data, self.ctx.domain)
            check_time(signed, time.time(), REPORT_MAX_AGE, self.settings.message_max_age)
            if self.ctx.nonces.used(signed):
                raise Refused(REPLAY, f"nonce {signed.nonce} was used", signed.signer)
        except Refused as exc:
            self.ctx.refusals.count(REPORT.name, exc)
            return
        try:
            self.reports.apply(signed.payload, first_try=first_try)
        except NotYet as exc:
            if not last_try:
                log.info(
                    "report %s of %s: %s (asking again)", signed.payload.status, signed.signer, exc
                )
                raise
            self.ctx.refusals.count(REPORT.name, Refused(exc.reason, str(exc), signed.signer))
        except Refused as exc:
            self.ctx.refusals.count(REPORT.name, exc)
        # applied or refused for good: the same message again is a replay
        self.ctx.nonces.claim(signed, REPORT_MAX_AGE + self.settings.message_max_age)

    def heartbeat(self, data: Any) -> None:
        """Record a signed heartbeat."""
        try:
            signed = HEARTBEAT.open(data, self.ctx.domain)
            self._fresh(signed)
            self._allowed(signed)
            problem = heartbeat_problem(signed.payload, self.settings.worker_max_slots)
            if problem:
                raise Refused(BAD_HEARTBEAT, problem, signed.signer)
            self._claim_nonce(signed, self.settings.message_max_age * 2)
        except Refused as exc:
            self.ctx.refusals.count(HEARTBEAT.name, exc)
            return
        self.fleet.heartbeat(signed.payload)

    def _fresh(self, signed: Signed[Any]) -> None:
        age = self.settings.message_max_age
        check_time(signed, time.time(), age, age)

    def _allowed(self, signed: Signed[Any]) -> None:
        allow = {a.lower() for a in self.settings.worker_allowlist}
        if allow and signed.signer not in allow:
            raise Refused(NOT_ALLOWED, "not in WORKERPOOL_WORKER_ALLOWLIST", signed.signer)

    def _claim_nonce(self, signed: Signed[Any], ttl: float) -> None:
        if not self.ctx.nonces.claim(signed, ttl):
            raise Refused(REPLAY, f"nonce {signed.nonce} was used", signed.signer)
