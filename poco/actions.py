"""PoCo transactions, one function per protocol step, each with its revert diagnosis.

Every function takes a :class:`~poco.chain.Wallet` (the sender) and returns the
:class:`~poco.chain.Receipt`; a revert raises :class:`~poco.errors.TransactionReverted` whose
message names the likely cause (see :mod:`poco.diagnose`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from eth_utils import to_checksum_address

from poco import diagnose
from poco.chain import ChainClient, Receipt, Wallet, _hex32
from poco.errors import PermanentError
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


def deposit(wallet: Wallet, nrlc: int) -> Receipt:
    """Native mode: deposit ``nrlc`` (1 nRLC = 1e9 wei) into the sender's PoCo account."""
    return _send(wallet, wallet.client.hub.functions.deposit(), value=nrlc * 10**9)


def withdraw(wallet: Wallet, nrlc: int) -> Receipt:
    return _send(wallet, wallet.client.hub.functions.withdraw(nrlc))


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
