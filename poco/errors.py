"""Errors of the protocol layer, split into retryable and permanent.

Callers (Celery tasks) retry :class:`RetryableError` with backoff and record
:class:`PermanentError` without retrying it blindly.
"""

from __future__ import annotations


class PocoError(Exception):
    """Base of every error raised by :mod:`poco`."""

    retryable = False


class RetryableError(PocoError):
    """A failure that may go away: transport error, timeout, node lagging."""

    retryable = True


class PermanentError(PocoError):
    """A failure that the same call will hit again: a revert, a bad argument."""


class TransportError(RetryableError):
    """The JSON-RPC node did not answer (connection refused, timeout, HTTP 5xx)."""


class TransactionTimeout(RetryableError):
    """A transaction was sent but no receipt arrived in time (it may still be mined)."""

    def __init__(self, message: str, tx_hash: str) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash


class TransactionReverted(PermanentError):
    """A call or transaction reverted. ``reason`` is the contract's own message (often empty
    in PoCo's Poco2 facet); ``diagnosis`` is our reading of the on-chain state that explains it."""

    def __init__(
        self,
        function: str,
        reason: str = "",
        diagnosis: str = "",
        tx_hash: str | None = None,
    ) -> None:
        self.function = function
        self.reason = reason
        self.diagnosis = diagnosis
        self.tx_hash = tx_hash
        parts = [f"{function} reverted"]
        parts.append(f"reason: {reason}" if reason else "no revert reason given by the contract")
        if diagnosis:
            parts.append(f"likely cause: {diagnosis}")
        if tx_hash:
            parts.append(f"tx {tx_hash}")
        super().__init__("; ".join(parts))


class TransactionRejected(RetryableError):
    """The chain node refused to take a transaction (JSON-RPC error at estimate or send, other
    than a revert): a nonce or fee it does not accept, a rate limit, a node out of sync. Kept
    retryable: the next tick, or the next attempt of a message, sends it again."""


class InsufficientFunds(PermanentError):
    """A wallet or a PoCo account holds less than an operation needs (gas, RLC, stake); the
    message says what is missing and how much. Raised before anything is sent."""


class NetworkMismatch(PermanentError):
    """The chain node is not the chain the settings name (chain id, or no PoCo at the hub)."""


class FilterRefused(PermanentError):
    """The chain node keeps no filter for us: it refuses ``eth_newBlockFilter`` (a node or a
    provider without filters, a load balancer whose nodes do not share them), or it no longer
    knows the filter it made (it expired or the node restarted)."""
