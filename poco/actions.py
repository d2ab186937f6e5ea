"""PoCo transactions, one function per protocol step, each with its revert diagnosis.

Every function takes a :class:`~poco.chain.Wallet` (the sender) and returns the
:class:`~poco.chain.Receipt`; a revert raises :class:`~poco.errors.TransactionReverted` whose
message names the likely cause (see :mod:`poco.diagnose`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

from eth_utils import to_checksum_address

from poco import diagnose
from poco.chain import ChainClient, Receipt, Wallet, _hex32
from poco.errors import InsufficientFunds, PermanentError
from poco.funds import format_rlc
from poco.orders import (
    ZERO_ADDRESS,
    AppOrder,
    DatasetOrder,
    Order,
    RequestOrder,
    WorkerpoolOrder,
)
from poco.proofs import result_hash, result_seal

SIGN = 0
CLOSE = 1
CONTRIBUTE_MIN_GAS = 600_000
# finalize and contributeAndFinalize measured at up to 295k and 476k gas without a callback
# (docs/protocol.md)
FINALIZE_GAS = 300_000
CONTRIBUTE_AND_FINALIZE_GAS = 500_000


def callback_min_gas(client: ChainClient, base: int) -> int:
    """The gas floor of a transaction that ends a task with a callback.

    PoCo (``IexecPoco2Facet.executeCallback``) calls ``receiveResult`` with exactly
    ``callbackgas`` gas and ignores its outcome: a consumer that reverts or runs out of gas
    costs nothing. Then it asserts ``gasleft() > callbackgas / 63``: a transaction whose gas
    could not give the consumer its full share reverts whole, and the task is not finalized.
    The estimate covers what the consumer did when it was made; the floor covers a consumer
    that uses more at mining time (EIP-150 forwards at most 63/64 of what is left)."""
    gas = client.callback_gas()
    return base + gas * 64 // 63 + 10_000


def _b(hexstr: str) -> bytes:
    return bytes.fromhex(hexstr.removeprefix("0x"))


def _send(wallet: Wallet, fn: object, **kw: object) -> Receipt:
    return cast(Receipt, wallet.transact(fn, **kw))  # type: ignore[arg-type]


Progress = Callable[[str], None]
DEPOSIT_VIA = ("approveAndCall", "approve")


def deposit(
    wallet: Wallet, nrlc: int, *, via: str = "approveAndCall", progress: Progress | None = None
) -> Receipt:
    """Deposit ``nrlc`` into the sender's PoCo account (its stake); returns the receipt of
    the transaction that credited it.

    Token mode (Arbitrum): the RLC comes from the wallet, with one ``RLC.approveAndCall(hub,
    nrlc, "")`` (what the iExec SDK sends) or, with ``via="approve"``, ``RLC.approve`` then
    ``hub.deposit(nrlc)``. Native mode: ``deposit()`` with ``nrlc * 1e9`` wei. The wallet is
    checked first (a short balance makes the RLC contract fail without a reason), and the
    receipt must show the hub minting the stake. ``progress`` hears each step."""
    if nrlc <= 0:
        raise ValueError("the amount to deposit must be positive")
    if via not in DEPOSIT_VIA:
        raise ValueError(f"via must be one of {', '.join(DEPOSIT_VIA)}")
    client = wallet.client
    say = progress or (lambda _: None)
    have = client.rlc_balance(wallet.address)
    if have < nrlc:
        unit = "RLC in the wallet" if client.mode == "token" else "native coin in the wallet"
        raise InsufficientFunds(
            f"deposit of {format_rlc(nrlc)} RLC exceeds the wallet balance: {wallet.address} has "
            f"{format_rlc(have)} {unit}"
        )
    if client.mode == "native":
        say(f"deposit(): sending {format_rlc(nrlc)} RLC as {nrlc * 10**9} wei")
        receipt = _send(wallet, client.native_hub().functions.deposit(), value=nrlc * 10**9)
    else:
        token = client.rlc()
        if via == "approveAndCall":
            say(f"RLC.approveAndCall(hub, {format_rlc(nrlc)} RLC): approve and deposit in one go")
            receipt = _send(wallet, token.functions.approveAndCall(client.hub_address, nrlc, b""))
        else:
            if client.rlc_allowance(wallet.address) != nrlc:
                say(f"RLC.approve(hub, {format_rlc(nrlc)} RLC)")
                done = _send(wallet, token.functions.approve(client.hub_address, nrlc))
                say(f"approved in block {done.block_number} (tx {done.tx_hash})")
            say(f"hub.deposit({format_rlc(nrlc)} RLC)")
            receipt = _send(wallet, client.hub.functions.deposit(nrlc))
    minted = sum(
        int(e["args"]["value"])
        for e in client.decode_receipt_events(receipt, "Transfer")
        if int(e["args"]["from"], 16) == 0 and e["args"]["to"].lower() == wallet.address.lower()
    )
    if minted != nrlc:
        raise PermanentError(
            f"deposit {receipt.tx_hash} was mined but the hub credited {minted} nRLC, "
            f"not {nrlc}: check the account (workerpool account show)"
        )
    say(f"deposited in block {receipt.block_number} (tx {receipt.tx_hash})")
    return receipt


def withdraw(wallet: Wallet, nrlc: int, *, progress: Progress | None = None) -> Receipt:
    """Withdraw ``nrlc`` of free stake back to the wallet (RLC in token mode, the coin in
    native mode). Locked stake cannot be withdrawn: the free stake is checked first."""
    if nrlc <= 0:
        raise ValueError("the amount to withdraw must be positive")
    client = wallet.client
    say = progress or (lambda _: None)
    account = client.view_account(wallet.address)
    if account.stake < nrlc:
        raise InsufficientFunds(
            f"withdrawal of {format_rlc(nrlc)} RLC exceeds the free stake: {wallet.address} "
            f"has {format_rlc(account.stake)} RLC deposited and free "
            f"({format_rlc(account.locked)} RLC locked)"
        )
    say(f"hub.withdraw({format_rlc(nrlc)} RLC)")
    receipt = _send(wallet, client.hub.functions.withdraw(nrlc))
    say(f"withdrawn in block {receipt.block_number} (tx {receipt.tx_hash})")
    return receipt


def create_workerpool(wallet: Wallet, description: str) -> tuple[str, Receipt | None]:
    """Register a workerpool owned by the sender in the hub's WorkerpoolRegistry; returns its
    address and the receipt (None when this owner already registered one with this
    description: the registry creates it with CREATE2, so the address is known beforehand and
    a second creation would revert)."""
    client = wallet.client
    registry_address = client.rpc(
        "workerpoolregistry", lambda: str(client.hub.functions.workerpoolregistry().call())
    )
    registry = client.contract("WorkerpoolRegistry", registry_address)
    owner = wallet.address
    predicted = str(
        client.rpc(
            "predictWorkerpool",
            lambda: registry.functions.predictWorkerpool(owner, description).call(),
        )
    )
    if client.rpc("get_code", lambda: bytes(client.eth.get_code(predicted))):
        return predicted, None
    return predicted, _send(wallet, registry.functions.createWorkerpool(owner, description))


def match_orders(
    wallet: Wallet,
    apporder: AppOrder,
    datasetorder: DatasetOrder | None,
    workerpoolorder: WorkerpoolOrder,
    requestorder: RequestOrder,
) -> tuple[str, Receipt]:
    """matchOrders; returns the dealid read from the SchedulerNotice event."""
    dataset = datasetorder or DatasetOrder()
    fn = wallet.client.hub.functions.matchOrders(
        apporder.as_tuple(), dataset.as_tuple(), workerpoolorder.as_tuple(), requestorder.as_tuple()
    )
    receipt = _send(wallet, fn)
    notices = wallet.client.decode_receipt_events(receipt, "SchedulerNotice")
    if not notices:
        raise PermanentError(f"matchOrders {receipt.tx_hash} emitted no SchedulerNotice")
    return "0x" + bytes(notices[0]["args"]["dealid"]).hex(), receipt


def initialize(wallet: Wallet, dealid: str, idx: int) -> Receipt:
    client = wallet.client
    return _send(
        wallet,
        client.hub.functions.initialize(_hex32(dealid), idx),
        diagnose=lambda: diagnose.initialize(client, dealid, idx),
    )


def initialize_array(wallet: Wallet, dealids: Sequence[str], idxs: Sequence[int]) -> Receipt:
    """initializeArray: one transaction for many tasks (fails whole if one task fails)."""
    if len(dealids) != len(idxs):
        raise ValueError("dealids and idxs differ in length")
    client = wallet.client

    def why() -> str:
        for d, i in zip(dealids, idxs, strict=True):
            reason = diagnose.initialize(client, d, i)
            if reason:
                return f"task ({d}, {i}): {reason}"
        return ""

    return _send(
        wallet,
        client.hub.functions.initializeArray([_hex32(d) for d in dealids], list(idxs)),
        diagnose=why,
    )


def contribute(
    wallet: Wallet,
    taskid: str,
    result_digest: str,
    authorization: str,
    enclave: str = ZERO_ADDRESS,
    enclave_sign: str = "0x",
) -> Receipt:
    client = wallet.client
    fn = client.hub.functions.contribute(
        _hex32(taskid),
        _hex32(result_hash(taskid, result_digest)),
        _hex32(result_seal(wallet.address, taskid, result_digest)),
        to_checksum_address(enclave),
        _b(enclave_sign),
        _b(authorization),
    )
    return _send(
        wallet,
        fn,
        diagnose=lambda: diagnose.contribute(
            client, wallet.address, taskid, authorization, enclave
        ),
        # the estimate may be made before another contribution lands; ours may then be the
        # one reaching consensus, which loops over contributors (docs/protocol.md: 311-390k gas)
        min_gas=CONTRIBUTE_MIN_GAS,
    )


def contribute_and_finalize(
    wallet: Wallet,
    taskid: str,
    result_digest: str,
    results: bytes,
    authorization: str,
    results_callback: bytes = b"",
    enclave: str = ZERO_ADDRESS,
    enclave_sign: str = "0x",
) -> Receipt:
    client = wallet.client
    fn = client.hub.functions.contributeAndFinalize(
        _hex32(taskid),
        _hex32(result_digest),
        results,
        results_callback,
        to_checksum_address(enclave),
        _b(enclave_sign),
        _b(authorization),
    )
    return _send(
        wallet,
        fn,
        diagnose=lambda: diagnose.contribute_and_finalize(
            client, wallet.address, taskid, authorization, results_callback, enclave
        ),
        min_gas=callback_min_gas(client, CONTRIBUTE_AND_FINALIZE_GAS) if results_callback else 0,
    )


def reveal(wallet: Wallet, taskid: str, result_digest: str) -> Receipt:
    client = wallet.client
    return _send(
        wallet,
        client.hub.functions.reveal(_hex32(taskid), _hex32(result_digest)),
        diagnose=lambda: diagnose.reveal(client, wallet.address, taskid, result_digest),
    )


def finalize(wallet: Wallet, taskid: str, results: bytes, results_callback: bytes = b"") -> Receipt:
    client = wallet.client
    return _send(
        wallet,
        client.hub.functions.finalize(_hex32(taskid), results, results_callback),
        diagnose=lambda: diagnose.finalize(client, wallet.address, taskid, results_callback),
        min_gas=callback_min_gas(client, FINALIZE_GAS) if results_callback else 0,
    )


def reopen(wallet: Wallet, taskid: str) -> Receipt:
    client = wallet.client
    return _send(
        wallet,
        client.hub.functions.reopen(_hex32(taskid)),
        diagnose=lambda: diagnose.reopen(client, wallet.address, taskid),
    )


def claim(wallet: Wallet, taskid: str) -> Receipt:
    client = wallet.client
    return _send(
        wallet,
        client.hub.functions.claim(_hex32(taskid)),
        diagnose=lambda: diagnose.claim(client, taskid),
    )


def claim_array(wallet: Wallet, taskids: Sequence[str]) -> Receipt:
    client = wallet.client

    def why() -> str:
        for t in taskids:
            reason = diagnose.claim(client, t)
            if reason:
                return f"task {t}: {reason}"
        return ""

    return _send(
        wallet, client.hub.functions.claimArray([_hex32(t) for t in taskids]), diagnose=why
    )


def manage_order(wallet: Wallet, order: Order, operation: int) -> Receipt:
    """Presign (``SIGN``) or close (``CLOSE``) an order on chain; the sender must be its signer."""
    hub = wallet.client.hub.functions
    kinds = {
        AppOrder: hub.manageAppOrder,
        DatasetOrder: hub.manageDatasetOrder,
        WorkerpoolOrder: hub.manageWorkerpoolOrder,
        RequestOrder: hub.manageRequestOrder,
    }
    fn = kinds[type(order)]
    return _send(wallet, fn((order.as_tuple(), operation, b"")))
