"""A chain client for PoCo: typed reads, locally signed transactions, bounded log queries.

Why it looks like this:

* every JSON-RPC call goes through :meth:`ChainClient.rpc`, which retries transport errors
  with exponential backoff and turns what is left into :class:`~poco.errors.TransportError`;
* transactions are signed locally; one :class:`NonceManager` per (node, account) is shared by
  every :class:`Wallet` of that account in the process, and the nonce is taken and the raw
  transaction sent under one lock, so concurrent senders never clash and a failed send never
  leaves a gap;
* gas is estimated before a nonce is taken: a call that would revert raises
  :class:`~poco.errors.TransactionReverted` with PoCo's reason, or (Poco2 reverts carry none)
  with a diagnosis read from ``viewTask``/``viewContribution`` (:mod:`poco.diagnose`);
* logs are read in block ranges of at most ``log_chunk`` blocks, halved when a node refuses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from eth_account import Account as EthAccount
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound, Web3RPCError
from web3.providers.rpc import HTTPProvider
from web3.types import RPCEndpoint

from poco.abi import load_abi, proxy_abi
from poco.errors import PermanentError, TransactionReverted, TransactionTimeout, TransportError
from poco.orders import Domain
from poco.types import Account, Category, ChainTaskStatus, Contribution, Deal, Task

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


def _hex32(value: str | bytes) -> bytes:
    raw = bytes.fromhex(value.removeprefix("0x")) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected a bytes32 value, got {len(raw)} bytes")
    return raw


@dataclass(frozen=True)
class Receipt:
    """What callers need from a mined transaction."""

    tx_hash: str
    block_number: int
    gas_used: int
    status: int
    logs: list[Any]
    contract_address: str | None = None


class NonceManager:
    """Hands out consecutive nonces for one account; resyncs from the node when told to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_nonce: int | None = None


_NONCE_MANAGERS: dict[tuple[str, str], NonceManager] = {}
_NONCE_MANAGERS_LOCK = threading.Lock()


def nonce_manager_for(endpoint: str, address: str) -> NonceManager:
    key = (endpoint, address.lower())
    with _NONCE_MANAGERS_LOCK:
        if key not in _NONCE_MANAGERS:
            _NONCE_MANAGERS[key] = NonceManager()
        return _NONCE_MANAGERS[key]


def reset_nonces() -> None:
    """Forget every cached nonce (after a chain reorg or an ``evm_revert`` on a devnet)."""
    with _NONCE_MANAGERS_LOCK:
        for manager in _NONCE_MANAGERS.values():
            with manager.lock:
                manager.next_nonce = None


class ChainClient:
    """Reads and log queries against one PoCo deployment. Build wallets with :meth:`wallet`."""

    def __init__(
        self,
        rpc_url: str,
        hub: str,
        *,
        request_timeout: float = 10.0,
        retries: int = 5,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        log_chunk: int = 2000,
        receipt_timeout: float = 120.0,
        poll_interval: float = 0.02,
    ) -> None:
        self.rpc_url = rpc_url
        provider = HTTPProvider(
            rpc_url,
            request_kwargs={"timeout": request_timeout},
            exception_retry_configuration=None,
            # web3 asks for the chain id before every call and gas estimate: cache it
            # (about half of all RPC calls per task otherwise, ops/bench measured)
            cache_allowed_requests=True,
            cacheable_requests={RPCEndpoint("eth_chainId")},
        )
        self.w3 = Web3(provider)
        # web3's stubs type addresses/hashes as NewTypes; we pass checked str, so use Any here
        self.eth: Any = self.w3.eth
        self.hub_address = to_checksum_address(hub)
        self.hub = self.eth.contract(address=self.hub_address, abi=proxy_abi(), decode_tuples=True)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.log_chunk = log_chunk
        self.receipt_timeout = receipt_timeout
        self.poll_interval = poll_interval
        self._domain: Domain | None = None
        self._chain_id: int | None = None
        self.rpc_calls = 0

    # ---- transport ----------------------------------------------------------------------
    def rpc(self, what: str, fn: Callable[[], T]) -> T:
        """Run one RPC operation, retrying transport errors with exponential backoff."""
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.rpc_calls += 1
            try:
                return fn()
            except TRANSPORT_ERRORS as exc:
                if attempt == self.retries:
                    raise TransportError(
                        f"{what}: chain node {self.rpc_url} unreachable after "
                        f"{self.retries + 1} attempts: {exc}"
                    ) from exc
                log.warning("%s: transport error (%s), retry in %.2fs", what, exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")

    def contract(self, name: str, address: str) -> Any:
        return self.eth.contract(
            address=to_checksum_address(address), abi=load_abi(name), decode_tuples=True
        )

    # ---- chain ------------------------------------------------------------------------------
    @property
    def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = self.rpc("chain_id", lambda: int(self.eth.chain_id))
        return self._chain_id

    def block_number(self) -> int:
        return self.rpc("block_number", lambda: int(self.eth.block_number))

    def block_timestamp(self, block: int | str = "latest") -> int:
        return self.rpc("get_block", lambda: int(self.eth.get_block(block)["timestamp"]))

    def domain(self) -> Domain:
        """The EIP-712 domain, read once from ``proxy.domain()``."""
        if self._domain is None:
            raw = self.rpc("domain", lambda: self.hub.functions.domain().call())
            self._domain = Domain(
                chain_id=raw.chainId,
                verifying_contract=raw.verifyingContract,
                name=raw.name,
                version=raw.version,
            )
        return self._domain

    # ---- reads ------------------------------------------------------------------------------
    def view_deal(self, dealid: str) -> Deal:
        raw = self.rpc("viewDeal", lambda: self.hub.functions.viewDeal(_hex32(dealid)).call())
        return Deal.from_chain(dealid, raw)

    def view_task(self, taskid: str) -> Task:
        raw = self.rpc("viewTask", lambda: self.hub.functions.viewTask(_hex32(taskid)).call())
        return Task.from_chain(taskid, raw)

    def view_contribution(self, taskid: str, worker: str) -> Contribution:
        raw = self.rpc(
            "viewContribution",
            lambda: self.hub.functions.viewContribution(
                _hex32(taskid), to_checksum_address(worker)
            ).call(),
        )
        return Contribution.from_chain(raw)

    def count_category(self) -> int:
        return self.rpc("countCategory", lambda: int(self.hub.functions.countCategory().call()))

    def view_category(self, category: int) -> Category:
        if category >= self.count_category():
            raise PermanentError(f"category {category} does not exist on chain")
        raw = self.rpc("viewCategory", lambda: self.hub.functions.viewCategory(category).call())
        return Category(category, raw.name, raw.description, raw.workClockTimeRef)

    def view_consumed(self, order_hash: str) -> int:
        return self.rpc(
            "viewConsumed",
            lambda: int(self.hub.functions.viewConsumed(_hex32(order_hash)).call()),
        )

    def view_account(self, address: str) -> Account:
        raw = self.rpc(
            "viewAccount",
            lambda: self.hub.functions.viewAccount(to_checksum_address(address)).call(),
        )
        return Account(stake=raw.stake, locked=raw.locked)

    def view_score(self, worker: str) -> int:
        return self.rpc(
            "viewScore",
            lambda: int(self.hub.functions.viewScore(to_checksum_address(worker)).call()),
        )

    def workerpool_owner(self, workerpool: str) -> str:
        pool = self.contract("Workerpool", workerpool)
        return self.rpc("Workerpool.owner", lambda: str(pool.functions.owner().call()))

    def app_multiaddr(self, app: str) -> bytes:
        contract = self.contract("App", app)
        return self.rpc(
            "App.m_appMultiaddr", lambda: bytes(contract.functions.m_appMultiaddr().call())
        )

    def verify_signature(self, signer: str, digest: str, signature: str) -> bool:
        return self.rpc(
            "verifySignature",
            lambda: bool(
                self.hub.functions.verifySignature(
                    to_checksum_address(signer),
                    _hex32(digest),
                    bytes.fromhex(signature.removeprefix("0x")),
                ).call()
            ),
        )

    def is_final(self, taskid: str) -> bool:
        return self.view_task(taskid).status in (ChainTaskStatus.COMPLETED, ChainTaskStatus.FAILED)

    # ---- logs -------------------------------------------------------------------------------
    def get_logs(
        self,
        event: str,
        from_block: int,
        to_block: int,
        argument_filters: dict[str, Any] | None = None,
        *,
        chunk: int | None = None,
    ) -> Iterator[Any]:
        """Decoded ``event`` logs of the proxy in [from_block, to_block], range by range.

        Yields in chain order. A range the node refuses (too many results) is halved.
        """
        size = max(1, chunk or self.log_chunk)
        start = from_block
        ev = getattr(self.hub.events, event)()
        while start <= to_block:
            end = min(start + size - 1, to_block)

            def fetch(s: int = start, e: int = end) -> list[Any]:
                return list(
                    ev.get_logs(argument_filters=argument_filters, from_block=s, to_block=e)
                )

            try:
                entries = self.rpc(f"get_logs {event} {start}-{end}", fetch)
            except Web3RPCError as exc:
                if end > start:
                    size = max(1, (end - start + 1) // 2)
                    log.info(
                        "get_logs %s %d-%d refused (%s); halving range", event, start, end, exc
                    )
                    continue
                raise
            entries.sort(key=lambda x: (x["blockNumber"], x["logIndex"]))
            yield from entries
            start = end + 1

    def decode_receipt_events(self, receipt: Receipt, event: str) -> list[Any]:
        ev = getattr(self.hub.events, event)()
        out = []
        for entry in receipt.logs:
            if entry["address"] != self.hub_address:
                continue
            try:
                out.append(ev.process_log(entry))
            except Exception:  # another event, or Transfer with another topic count
                continue
        return out

    # ---- sending ------------------------------------------------------------------------------
    def wallet(self, private_key: str | bytes) -> Wallet:
        return Wallet(self, EthAccount.from_key(private_key))


class Wallet:
    """An account that signs and sends PoCo transactions through a :class:`ChainClient`."""

    def __init__(self, client: ChainClient, account: LocalAccount) -> None:
        self.client = client
        self.account = account
        self.address: str = account.address
        self.nonces = nonce_manager_for(client.rpc_url, account.address)
        self.gas_price_multiplier = 1.0

    def __repr__(self) -> str:  # never show the key
        return f"Wallet({self.address})"

    def _fees(self) -> dict[str, int]:
        eth = self.client.eth
        block = self.client.rpc("get_block", lambda: eth.get_block("latest"))
        base = block.get("baseFeePerGas")
        if base is None:
            price = self.client.rpc("gas_price", lambda: int(eth.gas_price))
            return {"gasPrice": int(price * self.gas_price_multiplier)}
        tip = self.client.rpc("max_priority_fee", lambda: int(eth.max_priority_fee))
        tip = int(tip * self.gas_price_multiplier)
        return {"maxFeePerGas": 2 * int(base) + tip, "maxPriorityFeePerGas": tip}

    def _resync(self) -> int:
        return self.client.rpc(
            "get_transaction_count",
            lambda: int(self.client.eth.get_transaction_count(self.address, "pending")),
        )

    def transact(
        self,
        fn: Any,
        *,
        value: int = 0,
        gas: int | None = None,
        wait: bool = True,
        diagnose: Callable[[], str] | None = None,
        min_gas: int = 0,
    ) -> Receipt | str:
        """Estimate, sign and send ``fn`` (a bound contract function); wait for its receipt.

        Returns the :class:`Receipt` (or the tx hash when ``wait`` is false). Raises
        :class:`TransactionReverted` when the call would revert or reverted once mined.
        """
        name = getattr(fn, "fn_name", type(fn).__name__)
        tx_params: dict[str, Any] = {"from": self.address, "value": value}
        if gas is None:
            try:
                estimate = self.client.rpc(
                    f"estimate_gas {name}", lambda: int(fn.estimate_gas(tx_params))
                )
            except ContractLogicError as exc:
                raise TransactionReverted(
                    name, _revert_reason(exc), diagnose() if diagnose else ""
                ) from exc
            # the margin covers state that changes between estimate and mining (another
            # contribution landing first makes ours the one that reaches consensus)
            gas = max(int(estimate * 1.25) + 20_000, min_gas)
        fees = self._fees()
        with self.nonces.lock:
            if self.nonces.next_nonce is None:
                self.nonces.next_nonce = self._resync()
            for _ in range(3):
                nonce = self.nonces.next_nonce
                tx = fn.build_transaction(
                    {
                        **tx_params,
                        "gas": gas,
                        "nonce": nonce,
                        "chainId": self.client.chain_id,
                        **fees,
                    }
                )
                signed = self.account.sign_transaction(tx)
                try:
                    tx_hash = self._send_raw(signed.raw_transaction)
                except Web3RPCError as exc:
                    text = str(exc).lower()
                    if "nonce too low" in text or "nonce too high" in text:
                        if self._known(signed.hash):
                            # an earlier attempt of this very transaction got through
                            tx_hash = "0x" + bytes(signed.hash).hex()
                            self.nonces.next_nonce = nonce + 1
                            break
                        log.warning("%s: %s; resyncing nonce", self.address, exc)
                        self.nonces.next_nonce = self._resync()
                        continue
                    raise
                self.nonces.next_nonce = nonce + 1
                break
            else:
                raise TransportError(f"{name}: could not find a free nonce for {self.address}")
        log.debug("%s sent %s nonce=%d tx=%s", self.address, name, nonce, tx_hash)
        if not wait:
            return tx_hash
        receipt = self.wait(tx_hash, name)
        if receipt.status != 1:
            why = (
                f"out of gas (used all {receipt.gas_used})"
                if receipt.gas_used >= gas
                else "reverted once mined"
            )
            raise TransactionReverted(name, why, diagnose() if diagnose else "", tx_hash)
        return receipt

    def _known(self, tx_hash: bytes) -> bool:
        try:
            self.client.rpc("get_transaction", lambda: self.client.eth.get_transaction(tx_hash))
        except TransactionNotFound:
            return False
        return True

    def _send_raw(self, raw: bytes) -> str:
        eth = self.client.eth
        tx_hash = "0x" + Web3.keccak(raw).hex().removeprefix("0x")
        try:
            self.client.rpc("send_raw_transaction", lambda: eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            # A retry after a transport error may find the node already holds the tx.
            if "already known" in str(exc).lower() or "already imported" in str(exc).lower():
                return tx_hash
            raise
        return tx_hash

    def wait(self, tx_hash: str, name: str = "tx") -> Receipt:
        eth = self.client.eth
        deadline = time.monotonic() + self.client.receipt_timeout
        while True:
            try:
                r = self.client.rpc(
                    "get_transaction_receipt", lambda: eth.get_transaction_receipt(tx_hash)
                )
                return Receipt(
                    tx_hash=tx_hash,
                    block_number=int(r["blockNumber"]),
                    gas_used=int(r["gasUsed"]),
                    status=int(r["status"]),
                    logs=list(r["logs"]),
                    contract_address=r.get("contractAddress"),
                )
            except TransactionNotFound:
                pass
            if time.monotonic() > deadline:
                raise TransactionTimeout(f"{name}: no receipt for {tx_hash} yet", tx_hash)
            time.sleep(self.client.poll_interval)


def _revert_reason(exc: ContractLogicError) -> str:
    message = str(exc.message if getattr(exc, "message", None) else exc)
    message = message.removeprefix("execution reverted").lstrip(": ").strip()
    return message
