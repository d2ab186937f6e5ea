"""A chain client for PoCo: typed reads, locally signed transactions, bounded log queries.

Why it looks like this:

* every JSON-RPC call goes through :meth:`ChainClient.rpc`, which retries transport errors
  with exponential backoff and turns what is left into :class:`~poco.errors.TransportError`;
* transactions are signed locally; one :class:`NonceManager` per (node, account) is shared by
  every :class:`Wallet` of that account in the process, and the nonce is taken and the raw
  transaction sent under one lock, so concurrent senders never clash and a failed send never
  leaves a gap. Several processes sending with one account share their next nonce through a
  :class:`SharedNonces` given to the client (a lock and a counter held outside this layer, in
  Redis for the scheduler): the lock is taken around taking the nonce and sending;
* a node refusing a transaction is answered, not raised: a nonce it says is used (too low,
  a pending transaction holds it: "replacement transaction underpriced") is taken again from
  the node, fees below its base fee are read again, anything else becomes a retryable
  :class:`~poco.errors.TransactionRejected` (the tick or the message retries it);
* gas is estimated before a nonce is taken: a call that would revert raises
  :class:`~poco.errors.TransactionReverted` with PoCo's reason, or (Poco2 reverts carry none)
  with a diagnosis read from ``viewTask``/``viewContribution`` (:mod:`poco.diagnose`);
* a transaction not mined after ``replace_after`` seconds is looked at again: when nonces
  below it were never mined (a gap: a transaction the node dropped, or an external sender
  that skipped one) the gap is filled, by re-broadcasting what this process signed for those
  nonces or by a 0-value transfer to itself; when it is next in line and still waits, it is
  signed again with the same nonce and fees raised by ``fee_bump`` (up to ``max_fee``), so it
  replaces itself in the mempool; whichever version is mined is the answer;
* logs are read in block ranges of at most ``log_chunk`` blocks, halved when a node refuses;
* what cannot change on chain is read once per process: a deal (every field is set by
  matchOrders) and an app's multiaddr (iExec apps are immutable);
* the HTTP session reads the proxy and CA environment once, not on every request.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, OrderedDict, namedtuple
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import eth_abi
import requests
from eth_account import Account as EthAccount
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from eth_utils.abi import collapse_if_tuple, function_abi_to_4byte_selector
from web3 import Web3
from web3.exceptions import (
    BlockNotFound,
    ContractLogicError,
    TransactionNotFound,
    Web3RPCError,
)
from web3.providers.rpc import HTTPProvider
from web3.types import RPCEndpoint

from poco.abi import load_abi, native_proxy_abi, proxy_abi
from poco.errors import (
    FilterRefused,
    InsufficientFunds,
    PermanentError,
    PocoError,
    TransactionRejected,
    TransactionReverted,
    TransactionTimeout,
    TransportError,
)
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
    """Hands out consecutive nonces for one account; resyncs from the node when told to.

    ``signed`` keeps the raw transactions sent for the nonces not known to be mined, so that
    a gap (the node dropped one) can be repaired by sending them again."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next_nonce: int | None = None
        self.signed: dict[int, bytes] = {}

    def remember(self, nonce: int, raw: bytes, mined_below: int | None = None) -> None:
        self.signed[nonce] = raw
        if mined_below is not None:
            for old in [n for n in self.signed if n < mined_below]:
                del self.signed[old]


class SharedNonces(Protocol):
    """The next nonce of one account when several processes send with it. :meth:`hold` is
    exclusive across those processes while a nonce is taken and its transaction sent;
    :meth:`load` is None until the first is stored. Implemented outside the protocol layer
    (``pool.nonces``: Redis) and given to :class:`ChainClient` as a factory."""

    def hold(self) -> AbstractContextManager[object]: ...

    def load(self) -> int | None: ...

    def store(self, next_nonce: int) -> None: ...


# (chain id, address) -> the shared nonce of that account
SharedNoncesFactory = Callable[[int, str], SharedNonces]

# what a node answers when the nonce is not free (used, or held by a pending transaction)
NONCE_TAKEN = ("nonce too low", "nonce too high", "replacement transaction underpriced")
# what it answers when the fees are below what it takes now
FEES_TOO_LOW = (
    "max fee per gas less than block base fee",
    "fee cap less than block base fee",
    "transaction underpriced",
    "gas price too low",
)
SEND_ATTEMPTS = 5


def _refusal(exc: Exception) -> str:
    return str(getattr(exc, "message", None) or exc).lower()


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


def http_session(url: str) -> requests.Session:
    """A requests session for ``url`` that reads the proxy and CA environment once.

    requests looks at the environment (proxies, ``REQUESTS_CA_BUNDLE``) again on every request
    of a session that trusts it: about 7 % of a worker's CPU in ops/bench. The answer does not
    change while the process runs, so it is read here and the session stops trusting the
    environment."""
    session = requests.Session()
    found = session.merge_environment_settings(url, {}, None, None, None)
    session.proxies.update(found["proxies"])
    session.verify = found["verify"]
    session.trust_env = False
    return session


class _CountingProvider(HTTPProvider):
    """web3's HTTP provider, counting the requests it sends by JSON-RPC method (answers from
    web3's own cache are not requests, so they are not counted)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: Counter[str] = Counter()
        self._sent_lock = threading.Lock()

    def _make_request(self, method: RPCEndpoint, request_data: bytes) -> bytes:
        with self._sent_lock:
            self.sent[method] += 1
        return super()._make_request(method, request_data)


class _Read:
    """A read of one hub function, with what web3's contract machinery works out again on
    every call (the function's ABI entry found among ~100 and validated, its selector hashed,
    each value normalized by walking the ABI) worked out once: the arguments are encoded and
    the answer decoded with eth_abi, addresses checksummed and structs as named tuples, as
    web3 returns them. Half of a viewTask's CPU went to that machinery (ops/bench)."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.name = str(entry["name"])
        self.selector = function_abi_to_4byte_selector(cast(Any, entry))
        self.inputs = [collapse_if_tuple(arg) for arg in entry["inputs"]]
        outputs = entry["outputs"]
        self.outputs = [collapse_if_tuple(out) for out in outputs]
        self.shapes = [_shape(out) for out in outputs]

    def calldata(self, *args: Any) -> str:
        return "0x" + (self.selector + eth_abi.encode(self.inputs, args)).hex()

    def decode(self, answer: bytes) -> Any:
        values = eth_abi.decode(self.outputs, bytes(answer))
        shaped = [shape(value) for shape, value in zip(self.shapes, values, strict=True)]
        return shaped[0] if len(shaped) == 1 else tuple(shaped)


def _shape(arg: dict[str, Any]) -> Callable[[Any], Any]:
    """How a decoded value of ABI type ``arg`` is given back (as web3 gives it)."""
    kind = str(arg["type"])
    if kind.endswith("]"):  # an array: each element shaped as the element type
        inner = _shape({**arg, "type": kind[: kind.rindex("[")]})
        return lambda values: [inner(v) for v in values]
    if kind == "tuple":
        components = arg["components"]
        record = namedtuple(  # type: ignore[misc]  # (names from the ABI)
            str(arg.get("internalType", "tuple")).rpartition(".")[2].split(" ")[-1] or "Struct",
            [str(c["name"]) for c in components],
            rename=True,
        )
        parts = [_shape(c) for c in components]
        return lambda value: record(*(part(v) for part, v in zip(parts, value, strict=True)))
    if kind == "address":
        return to_checksum_address
    return lambda value: value


@functools.cache
def _hub_reads() -> dict[str, _Read]:
    """The hub reads made for every task, worked out once per process."""
    wanted = {"viewTask", "viewContribution"}
    return {
        str(entry["name"]): _Read(entry)
        for entry in proxy_abi()
        if entry.get("type") == "function" and entry.get("name") in wanted
    }


class _Immutable:
    """A bounded memo of chain values that never change once they exist (LRU)."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, read: Callable[[], T], keep: Callable[[T], bool]) -> T:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = read()
        if keep(value):
            with self._lock:
                self._values[key] = value
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
        return value

    def forget(self, key: Hashable) -> None:
        """Drop ``key``: what was true may have been undone (a chain reorganisation)."""
        with self._lock:
            self._values.pop(key, None)


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
        replace_after: float = 30.0,
        fee_bump: float = 1.25,
        max_fee: int = 0,
        shared_nonces: SharedNoncesFactory | None = None,
    ) -> None:
        self.rpc_url = rpc_url
        self.shared_nonces = shared_nonces
        provider = _CountingProvider(
            rpc_url,
            request_kwargs={"timeout": request_timeout},
            exception_retry_configuration=None,
            # web3 asks for the chain id before every call and gas estimate: cache it
            # (about half of all RPC calls per task otherwise, ops/bench measured)
            cache_allowed_requests=True,
            cacheable_requests={RPCEndpoint("eth_chainId")},
            session=http_session(rpc_url),
        )
        self.provider = provider
        self.w3 = Web3(provider)
        # web3's stubs type addresses/hashes as NewTypes; we pass checked str, so use Any here
        self.eth: Any = self.w3.eth
        self.hub_address = to_checksum_address(hub)
        self.hub = self.eth.contract(address=self.hub_address, abi=proxy_abi(), decode_tuples=True)
        self._reads = _hub_reads()
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.log_chunk = log_chunk
        self.receipt_timeout = receipt_timeout
        self.poll_interval = poll_interval
        self.replace_after = replace_after
        # geth and anvil take a replacement only with both fees raised by >= 10 %
        self.fee_bump = max(fee_bump, 1.11)
        self.max_fee = max_fee  # wei; 0: no ceiling
        self._fees: tuple[float, dict[str, int]] | None = None
        self._fees_lock = threading.Lock()
        self._domain: Domain | None = None
        self._chain_id: int | None = None
        self._token: str | None = None
        self._immutable = _Immutable()
        self._latest: tuple[float, int] | None = None  # (monotonic read time, block timestamp)
        self.rpc_calls = 0
        self.transactions: Counter[str] = Counter()  # sent (replacements too), by function
        # sends the node refused, by reason (nonce taken, fees too low, other)
        self.refusals: Counter[str] = Counter()
        self._tx_lock = threading.Lock()

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

    def usage(self) -> dict[str, dict[str, int]]:
        """What this client asked of its node since it was made: requests by JSON-RPC method
        (``calls``) and transactions by PoCo function, replacements included
        (``transactions``)."""
        with self.provider._sent_lock:
            calls = dict(self.provider.sent)
        with self._tx_lock:
            transactions = dict(self.transactions)
        return {"calls": calls, "transactions": transactions}

    def _count_transaction(self, name: str) -> None:
        with self._tx_lock:
            self.transactions[name] += 1

    def _count_refusal(self, kind: str) -> None:
        with self._tx_lock:
            self.refusals[kind] += 1

    def forget_fees(self) -> None:
        """Read the fees again at the next transaction (the node found them too low)."""
        with self._fees_lock:
            self._fees = None

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

    def block_hash(self, block: int) -> str | None:
        """The hash of block ``block`` on the node's canonical chain (None: no such block)."""

        def read() -> str | None:
            try:
                found = self.eth.get_block(block)
            except BlockNotFound:
                return None
            return "0x" + bytes(found["hash"]).hex()

        return self.rpc("get_block", read)

    def block_timestamp(self, block: int | str = "latest", max_age: float = 0.0) -> int:
        """The timestamp of ``block``. With ``max_age``, the latest block's timestamp may be
        one read up to ``max_age`` seconds ago (for checks made many times a second whose
        margins are minutes, like a contribution deadline)."""
        latest = self._latest
        fresh = latest is not None and time.monotonic() - latest[0] < max_age
        if block == "latest" and fresh and latest is not None:
            return latest[1]
        stamp = self.rpc("get_block", lambda: int(self.eth.get_block(block)["timestamp"]))
        if block == "latest":
            self._latest = (time.monotonic(), stamp)
        return stamp

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
    def view_deal(self, dealid: str, *, fresh: bool = False) -> Deal:
        """The deal; read once per process once it exists (matchOrders sets every field).
        ``fresh`` reads it again: a chain reorganisation may have removed or moved it."""

        def read() -> Deal:
            raw = self.rpc("viewDeal", lambda: self.hub.functions.viewDeal(_hex32(dealid)).call())
            return Deal.from_chain(dealid, raw)

        key = ("deal", dealid.lower())
        if fresh:
            self._immutable.forget(key)
        return self._immutable.get(key, read, lambda d: d.exists)

    def view_task(self, taskid: str) -> Task:
        return Task.from_chain(taskid, self._read("viewTask", _hex32(taskid)))

    def view_contribution(self, taskid: str, worker: str) -> Contribution:
        raw = self._read("viewContribution", _hex32(taskid), to_checksum_address(worker))
        return Contribution.from_chain(raw)

    def _read(self, name: str, *args: Any) -> Any:
        """Call the hub's view function ``name`` (the hot reads: :class:`_Read`)."""
        read = self._reads[name]
        data = read.calldata(*args)
        answer = self.rpc(name, lambda: self.eth.call({"to": self.hub_address, "data": data}))
        return read.decode(answer)

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

    # ---- token or native ---------------------------------------------------------------------
    def token_address(self) -> str:
        """The ERC-20 the hub escrows (``token()``, read once): RLC in token mode (Arbitrum),
        the zero address in native mode (docs/protocol.md, "Token mode")."""
        if self._token is None:
            self._token = self.rpc("token", lambda: str(self.hub.functions.token().call()))
        return self._token

    @property
    def mode(self) -> str:
        """``token`` (stakes are the RLC ERC-20, as on Arbitrum) or ``native`` (stakes are the
        chain's coin, 1 nRLC = 1e9 wei)."""
        return "native" if int(self.token_address(), 16) == 0 else "token"

    def rlc(self) -> Any:
        """The RLC contract of a token-mode hub."""
        if self.mode != "token":
            raise PermanentError("this hub runs in native mode: it has no RLC token")
        return self.contract("RLC", self.token_address())

    def native_hub(self) -> Any:
        """The proxy with the native-mode interface (its payable ``deposit()``)."""
        return self.eth.contract(
            address=self.hub_address, abi=native_proxy_abi(), decode_tuples=True
        )

    def native_balance(self, address: str) -> int:
        """The account's balance in the chain's coin, in wei (what pays for gas)."""
        return self.rpc(
            "get_balance", lambda: int(self.eth.get_balance(to_checksum_address(address)))
        )

    def rlc_balance(self, address: str) -> int:
        """RLC in the wallet (not deposited), in nRLC; in native mode the coin itself counts
        (1 nRLC = 1e9 wei), since that is what ``deposit()`` takes."""
        if self.mode == "native":
            return self.native_balance(address) // 10**9
        token = self.rlc()
        return self.rpc(
            "RLC.balanceOf",
            lambda: int(token.functions.balanceOf(to_checksum_address(address)).call()),
        )

    def rlc_allowance(self, owner: str) -> int:
        """RLC the hub may take from ``owner``'s wallet (token mode; 0 in native mode)."""
        if self.mode == "native":
            return 0
        token = self.rlc()
        return self.rpc(
            "RLC.allowance",
            lambda: int(
                token.functions.allowance(to_checksum_address(owner), self.hub_address).call()
            ),
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
        """The app's image reference; read once per process (an iExec app is immutable)."""

        def read() -> bytes:
            contract = self.contract("App", app)
            return self.rpc(
                "App.m_appMultiaddr", lambda: bytes(contract.functions.m_appMultiaddr().call())
            )

        return self._immutable.get(("app", app.lower()), read, bool)

    def callback_gas(self) -> int:
        """The gas PoCo hands a deal's callback contract (``callbackgas``, 100,000 as
        deployed; its owner may change it)."""
        return self.rpc("callbackgas", lambda: int(self.hub.functions.callbackgas().call()))

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

    # ---- new blocks -------------------------------------------------------------------------
    def new_block_filter(self) -> str:
        """A block filter on the node (``eth_newBlockFilter``): its id, for
        :meth:`block_filter_changes`. Raises :class:`FilterRefused` when the node makes none."""

        def make() -> str:
            found = self.provider.make_request(RPCEndpoint("eth_newBlockFilter"), [])
            if "error" in found or not isinstance(found.get("result"), str):
                raise FilterRefused(f"the chain node makes no block filter: {found.get('error')}")
            return str(found["result"])

        return self.rpc("new_block_filter", make)

    def block_filter_changes(self, filter_id: str) -> list[str]:
        """The hashes of the blocks the node added since the last look at ``filter_id``
        (``eth_getFilterChanges``). Raises :class:`FilterRefused` when the node no longer
        knows the filter."""

        def changes() -> list[str]:
            found = self.provider.make_request(RPCEndpoint("eth_getFilterChanges"), [filter_id])
            result = found.get("result")
            if "error" in found or not isinstance(result, list):
                raise FilterRefused(f"block filter {filter_id}: {found.get('error')}")
            return [str(h) for h in result]

        return self.rpc("block_filter_changes", changes)

    def uninstall_filter(self, filter_id: str) -> None:
        """Let the node forget ``filter_id`` (``eth_uninstallFilter``; whatever it answers)."""
        self.rpc(
            "uninstall_filter",
            lambda: self.provider.make_request(RPCEndpoint("eth_uninstallFilter"), [filter_id]),
        )

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
    FEES_TTL = 2.0  # seconds: fees are read at most once per block time, not per transaction

    def fees(self) -> dict[str, int]:
        """EIP-1559 fees (``maxFeePerGas`` = 2 x base fee + tip) or a legacy gas price."""
        with self._fees_lock:
            if self._fees is not None and time.monotonic() - self._fees[0] < self.FEES_TTL:
                return dict(self._fees[1])
        eth = self.eth
        block = self.rpc("get_block", lambda: eth.get_block("latest"))
        base = block.get("baseFeePerGas")
        fees: dict[str, int]
        if base is None:
            fees = {"gasPrice": self.rpc("gas_price", lambda: int(eth.gas_price))}
        else:
            tip = self.rpc("max_priority_fee", lambda: int(eth.max_priority_fee))
            fees = {"maxFeePerGas": 2 * int(base) + tip, "maxPriorityFeePerGas": tip}
        with self._fees_lock:
            self._fees = (time.monotonic(), fees)
        return dict(fees)

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
        self._shared: SharedNonces | None = None

    def __repr__(self) -> str:  # never show the key
        return f"Wallet({self.address})"

    def _fees(self) -> dict[str, int]:
        return {k: int(v * self.gas_price_multiplier) for k, v in self.client.fees().items()}

    def _resync(self) -> int:
        return self._count("pending")

    def shared_nonces(self) -> SharedNonces | None:
        """The nonce this account shares with other processes (None: this process only)."""
        factory = self.client.shared_nonces
        if factory is None:
            return None
        if self._shared is None:
            self._shared = factory(self.client.chain_id, self.address)
        return self._shared

    def _count(self, block: str) -> int:
        return self.client.rpc(
            f"get_transaction_count {block}",
            lambda: int(self.client.eth.get_transaction_count(self.address, block)),
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
        call = _calldata(fn)
        if call is not None:  # encoded once for the estimate and every signature
            tx_params.update(call)
        if gas is None:
            eth = self.client.eth

            def estimate_gas() -> int:
                if call is not None:
                    return int(eth.estimate_gas(tx_params))
                return int(fn.estimate_gas(tx_params))

            try:
                estimate = self.client.rpc(f"estimate_gas {name}", estimate_gas)
            except ContractLogicError as exc:
                raise TransactionReverted(
                    name, _revert_reason(exc), diagnose() if diagnose else ""
                ) from exc
            except Web3RPCError as exc:
                if "revert" in _refusal(exc):  # a revert the node words its own way
                    raise TransactionReverted(
                        name, str(exc), diagnose() if diagnose else ""
                    ) from exc
                raise _rejected(name, self.address, exc) from exc
            # the margin covers state that changes between estimate and mining (another
            # contribution landing first makes ours the one that reaches consensus)
            gas = max(int(estimate * 1.25) + 20_000, min_gas)
        fees = self._fees()

        def sign(nonce: int, fees: dict[str, int]) -> Any:
            fields: dict[str, Any] = {
                **tx_params,
                "gas": gas,
                "nonce": nonce,
                "chainId": self.client.chain_id,
                **fees,
            }
            if call is not None:
                fields.pop("from")
                if "gasPrice" not in fees:
                    fields["type"] = 2
                return self.account.sign_transaction(fields)
            return self.account.sign_transaction(fn.build_transaction(fields))

        shared = self.shared_nonces()
        with self.nonces.lock, shared.hold() if shared is not None else nullcontext():
            if shared is not None:  # another process may have sent since: its count wins
                self.nonces.next_nonce = shared.load()
            if self.nonces.next_nonce is None:
                self.nonces.next_nonce = self._resync()
            nonce, signed, tx_hash, fees = self._send_next(name, sign, fees)
            if shared is not None:
                shared.store(nonce + 1)
            self.nonces.remember(nonce, bytes(signed.raw_transaction))
        log.debug("%s sent %s nonce=%d tx=%s", self.address, name, nonce, tx_hash)
        if not wait:
            return tx_hash
        receipt = self._await(_Pending(name, nonce, fees, [tx_hash], sign))
        if receipt.status != 1:
            why = (
                f"out of gas (used all {receipt.gas_used})"
                if receipt.gas_used >= gas
                else "reverted once mined"
            )
            raise TransactionReverted(name, why, diagnose() if diagnose else "", receipt.tx_hash)
        return receipt

    def _send_next(
        self, name: str, sign: Callable[[int, dict[str, int]], Any], fees: dict[str, int]
    ) -> tuple[int, Any, str, dict[str, int]]:
        """Sign with the next nonce and send (the caller holds the nonce locks); returns the
        nonce, the signed transaction, its hash and the fees it carries. A nonce the node says
        is taken is read again from the node, fees below what it takes now are read again and
        raised; any other refusal is raised as :class:`TransactionRejected` (or
        :class:`InsufficientFunds`)."""
        last: Exception | None = None
        for _ in range(SEND_ATTEMPTS):
            nonce = self.nonces.next_nonce
            assert nonce is not None, "nonce not synced"
            signed = sign(nonce, fees)
            try:
                tx_hash = self._send_raw(signed.raw_transaction, name)
            except Web3RPCError as exc:
                last = exc
                text = _refusal(exc)
                if any(reason in text for reason in NONCE_TAKEN):
                    if not self._known(signed.hash):
                        self.client._count_refusal("nonce")
                        log.warning(
                            "%s: %s with nonce %d refused (%s); taking the next free one",
                            self.address,
                            name,
                            nonce,
                            text,
                        )
                        # a pending transaction holds it: the next one at least, whatever a
                        # node behind a load balancer counts
                        floor = nonce + 1 if "underpriced" in text else 0
                        self.nonces.next_nonce = max(self._resync(), floor)
                        continue
                    # an earlier attempt of this very transaction got through
                    tx_hash = "0x" + bytes(signed.hash).hex()
                elif any(reason in text for reason in FEES_TOO_LOW):
                    self.client._count_refusal("fees")
                    log.warning(
                        "%s: %s fees refused (%s); reading them again", self.address, name, text
                    )
                    self.client.forget_fees()
                    fees = _bumped(self._fees(), self.client.fee_bump, self.client.max_fee)
                    continue
                else:
                    self.client._count_refusal("other")
                    raise _rejected(name, self.address, exc) from exc
            self.nonces.next_nonce = nonce + 1
            return nonce, signed, tx_hash, fees
        raise TransactionRejected(
            f"{name}: the chain node refused it {SEND_ATTEMPTS} times, last: {last}"
        )

    def _known(self, tx_hash: bytes | str) -> bool:
        try:
            self.client.rpc("get_transaction", lambda: self.client.eth.get_transaction(tx_hash))
        except TransactionNotFound:
            return False
        return True

    def _send_raw(self, raw: bytes, name: str) -> str:
        """Send a signed transaction; counted under ``name`` when the node takes it."""
        eth = self.client.eth
        tx_hash = "0x" + Web3.keccak(raw).hex().removeprefix("0x")
        try:
            self.client.rpc("send_raw_transaction", lambda: eth.send_raw_transaction(raw))
        except Web3RPCError as exc:
            # A retry after a transport error may find the node already holds the tx.
            if "already known" in str(exc).lower() or "already imported" in str(exc).lower():
                return tx_hash
            raise
        self.client._count_transaction(name)
        return tx_hash

    def _receipt(self, tx_hash: str) -> Receipt | None:
        try:
            r = self.client.rpc(
                "get_transaction_receipt", lambda: self.client.eth.get_transaction_receipt(tx_hash)
            )
        except TransactionNotFound:
            return None
        return Receipt(
            tx_hash=tx_hash,
            block_number=int(r["blockNumber"]),
            gas_used=int(r["gasUsed"]),
            status=int(r["status"]),
            logs=list(r["logs"]),
            contract_address=r.get("contractAddress"),
        )

    def wait(self, tx_hash: str, name: str = "tx") -> Receipt:
        """Wait for the receipt of a transaction sent elsewhere (no replacement)."""
        deadline = time.monotonic() + self.client.receipt_timeout
        while True:
            receipt = self._receipt(tx_hash)
            if receipt is not None:
                return receipt
            if time.monotonic() > deadline:
                raise TransactionTimeout(f"{name}: no receipt for {tx_hash} yet", tx_hash)
            time.sleep(self.client.poll_interval)

    def _await(self, pending: _Pending) -> Receipt:
        """Wait for whichever version of ``pending`` is mined; every ``replace_after``
        seconds without one, repair a nonce gap below it or replace it with higher fees."""
        client = self.client
        deadline = time.monotonic() + client.receipt_timeout
        next_check = time.monotonic() + client.replace_after
        while True:
            for tx_hash in pending.hashes:
                receipt = self._receipt(tx_hash)
                if receipt is not None:
                    return receipt
            now = time.monotonic()
            if now > deadline:
                raise TransactionTimeout(
                    f"{pending.name}: no receipt for {pending.hashes[-1]} after "
                    f"{client.receipt_timeout:.0f}s ({len(pending.hashes)} version(s) sent)",
                    pending.hashes[-1],
                )
            if now >= next_check:
                self._unstick(pending)
                next_check = time.monotonic() + client.replace_after
            time.sleep(client.poll_interval)

    def _unstick(self, pending: _Pending) -> None:
        mined = self._count("latest")
        if mined > pending.nonce:
            # the nonce is used: by one of our versions (its receipt comes next poll) or by a
            # transaction from elsewhere, and then ours can never be mined
            if not any(self._receipt(h) for h in pending.hashes):
                raise TransactionReverted(
                    pending.name,
                    f"nonce {pending.nonce} of {self.address} was used by another transaction",
                )
            return
        if mined < pending.nonce:
            self._fill_gap(mined, pending.nonce)
            return
        fees = _bumped(pending.fees, self.client.fee_bump, self.client.max_fee)
        if fees == pending.fees:
            log.warning(
                "%s: %s nonce %d still not mined; fees at the ceiling (WORKERPOOL_MAX_FEE_GWEI)",
                self.address,
                pending.name,
                pending.nonce,
            )
            return
        signed = pending.sign(pending.nonce, fees)
        try:
            tx_hash = self._send_raw(signed.raw_transaction, pending.name)
        except Web3RPCError as exc:
            text = str(exc).lower()
            if "nonce too low" in text:
                return  # a version was mined meanwhile: its receipt comes next poll
            if "underpriced" in text:
                pending.fees = fees  # not enough for this node: raise again next time
                log.warning(
                    "%s: replacement of %s underpriced: %s", self.address, pending.name, exc
                )
                return
            raise _rejected(pending.name, self.address, exc) from exc
        log.warning(
            "%s: %s nonce %d not mined after %.0fs; replaced by %s with fees %s",
            self.address,
            pending.name,
            pending.nonce,
            self.client.replace_after,
            tx_hash,
            fees,
        )
        pending.fees = fees
        pending.hashes.append(tx_hash)
        with self.nonces.lock:
            self.nonces.remember(pending.nonce, bytes(signed.raw_transaction), mined_below=mined)

    def _fill_gap(self, first: int, stop: int) -> None:
        """Nonces [first, stop) were never mined: send again what we signed for them, or a
        0-value transfer to ourselves where we have nothing (another sender skipped it) or
        the node refuses it now. Nonces the node holds pending transactions for (another
        process sharing the account sent them) are not gaps: they are left alone, so that a
        filler never replaces someone's transaction."""
        first = max(first, self._count("pending"))
        fees = _bumped(self.client.fees(), self.client.fee_bump, self.client.max_fee)
        for nonce in range(first, stop):
            with self.nonces.lock:
                raw = self.nonces.signed.get(nonce)
            if raw is not None:
                try:
                    self._send_raw(raw, "resent (nonce gap)")
                    log.warning("%s: nonce gap at %d: sent again", self.address, nonce)
                    continue
                except Web3RPCError as exc:
                    if "nonce too low" in str(exc).lower():
                        continue
                    log.warning("%s: nonce gap at %d: %s", self.address, nonce, exc)
            tx: dict[str, Any] = {
                "to": self.address,
                "value": 0,
                "gas": 21_000,
                "nonce": nonce,
                "chainId": self.client.chain_id,
                **fees,
            }
            try:
                self._send_raw(
                    bytes(self.account.sign_transaction(tx).raw_transaction), "gap filler"
                )
            except Web3RPCError as exc:
                if "nonce too low" not in str(exc).lower():
                    log.warning("%s: nonce gap at %d: %s", self.address, nonce, exc)
                continue
            log.warning("%s: nonce gap at %d filled with a 0-value transfer", self.address, nonce)


@dataclass
class _Pending:
    """A transaction being waited for: every version sent for its nonce, newest last."""

    name: str
    nonce: int
    fees: dict[str, int]
    hashes: list[str]
    sign: Callable[[int, dict[str, int]], Any]


def _calldata(fn: Any) -> dict[str, Any] | None:
    """``to`` and ``data`` of a bound contract function, encoded once (web3 encodes again,
    ABI lookup included, for each estimate and each ``build_transaction``); None for what is
    not a call to a deployed contract (a constructor)."""
    address = getattr(fn, "address", None)
    encode = getattr(fn, "_encode_transaction_data", None)
    if not address or encode is None:
        return None
    return {"to": address, "data": encode()}


def _bumped(fees: dict[str, int], factor: float, ceiling: int) -> dict[str, int]:
    """Fees raised by ``factor`` (each at least +1 wei), capped at ``ceiling`` when set."""
    out = {k: max(int(v * factor), v + 1) for k, v in fees.items()}
    if ceiling:
        out = {k: min(v, max(ceiling, fees[k])) for k, v in out.items()}
        if "maxPriorityFeePerGas" in out:
            out["maxPriorityFeePerGas"] = min(out["maxPriorityFeePerGas"], out["maxFeePerGas"])
    return out


def _rejected(name: str, sender: str, exc: Exception) -> PocoError:
    """What a node's refusal of a transaction becomes (never a bare JSON-RPC error)."""
    if "insufficient funds" in _refusal(exc):
        return InsufficientFunds(f"{name}: {sender} cannot pay for the gas: {exc}")
    return TransactionRejected(f"{name}: the chain node refused the transaction of {sender}: {exc}")


def _revert_reason(exc: ContractLogicError) -> str:
    message = str(exc.message if getattr(exc, "message", None) else exc)
    message = message.removeprefix("execution reverted").lstrip(": ").strip()
    return message
