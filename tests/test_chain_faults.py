"""Transactions that do not get mined, on the real chain: anvil with automine off plays a node
whose mempool holds a transaction back.

* a transaction still pending after ``replace_after`` is signed again with the same nonce and
  higher fees, and the replacement is what gets mined (one nonce used, not two);
* a nonce gap below our transaction (the node dropped one, or another sender skipped one) is
  filled, so the transactions above it get mined;
* a nonce taken by a transaction from elsewhere ends with a clear error, not a wait forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from devnet_fixtures import DevnetHandle

from poco import chain as chain_mod
from poco.chain import ChainClient, Receipt, Wallet
from poco.errors import TransactionReverted

pytestmark = pytest.mark.devnet

SPENDER = "0x000000000000000000000000000000000000dEaD"


@pytest.fixture
def manual_mining(chain_snapshot: DevnetHandle) -> Iterator[DevnetHandle]:
    chain_snapshot.rpc("evm_setAutomine", [False])
    try:
        yield chain_snapshot
    finally:
        chain_snapshot.rpc("evm_setAutomine", [True])


def _client(devnet: DevnetHandle, **kw: Any) -> ChainClient:
    return ChainClient(
        devnet.info["rpc_url"], devnet.info["hub"], receipt_timeout=30, poll_interval=0.05, **kw
    )


def _approve(wallet: Wallet, amount: int) -> Any:
    return wallet.client.hub.functions.approve(SPENDER, amount)


def _in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _pool_content(devnet: DevnetHandle, address: str) -> dict[int, Any]:
    content = devnet.rpc("txpool_content")["result"]
    pending = {k.lower(): v for k, v in content["pending"].items()}
    queued = {k.lower(): v for k, v in content["queued"].items()}
    mine = {**queued.get(address.lower(), {}), **pending.get(address.lower(), {})}
    return {int(n): tx for n, tx in mine.items()}


def _wait_for(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_a_transaction_held_in_the_mempool_is_replaced_with_higher_fees(
    manual_mining: DevnetHandle,
) -> None:
    devnet = manual_mining
    client = _client(devnet, replace_after=0.5, fee_bump=1.25)
    wallet = client.wallet(devnet.key("requester"))
    start_nonce = wallet._count("latest")
    thread, out = _in_thread(lambda: wallet.transact(_approve(wallet, 7)))
    # Given the transaction waits in the pool, then is replaced (same nonce, higher fee)
    first: dict[str, Any] = {}

    def replaced() -> bool:
        txs = _pool_content(devnet, wallet.address)
        if start_nonce in txs and not first:
            first.update(txs[start_nonce])
        return bool(first) and txs.get(start_nonce, {}).get("hash") != first["hash"]

    _wait_for(replaced)
    # When a block is mined
    devnet.rpc("evm_mine", [])
    thread.join(timeout=20)
    # Then the receipt is the replacement's, one nonce was used, and it paid more
    receipt = out.get("value")
    assert isinstance(receipt, Receipt), out
    assert receipt.status == 1 and receipt.tx_hash != first["hash"]
    mined = client.eth.get_transaction(receipt.tx_hash)
    assert mined["nonce"] == start_nonce
    assert mined["maxFeePerGas"] > int(first["maxFeePerGas"], 16)
    assert wallet._count("latest") == start_nonce + 1
    allowance = client.hub.functions.allowance(wallet.address, SPENDER).call()
    assert allowance == 7


def test_a_nonce_gap_below_our_transaction_is_filled(manual_mining: DevnetHandle) -> None:
    devnet = manual_mining
    devnet.rpc("evm_setAutomine", [True])
    client = _client(devnet, replace_after=0.5)
    wallet = client.wallet(devnet.key("requester"))
    mined_nonce = wallet._count("latest")
    first_block = client.block_number() + 1
    # Given our nonce counter is one ahead of the chain: the transaction for `mined_nonce`
    # never reached a block (a node restarted and dropped it) and nobody holds it any more
    with wallet.nonces.lock:
        wallet.nonces.next_nonce = mined_nonce + 1
        wallet.nonces.signed.pop(mined_nonce, None)
    # When we send: our transaction waits behind the gap
    receipt = wallet.transact(_approve(wallet, 11))
    # Then the gap was filled by a 0-value transfer to ourselves and ours was mined
    assert isinstance(receipt, Receipt) and receipt.status == 1
    assert wallet._count("latest") == mined_nonce + 2
    sent = [
        tx
        for b in range(first_block, receipt.block_number + 1)
        for tx in client.eth.get_block(b, full_transactions=True)["transactions"]
        if tx["from"].lower() == wallet.address.lower()
    ]
    assert [tx["nonce"] for tx in sent] == [mined_nonce, mined_nonce + 1]
    assert sent[0]["to"].lower() == wallet.address.lower() and sent[0]["value"] == 0
    assert client.hub.functions.allowance(wallet.address, SPENDER).call() == 11


def test_our_own_dropped_transaction_is_broadcast_again_to_fill_the_gap(
    manual_mining: DevnetHandle,
) -> None:
    devnet = manual_mining
    client = _client(devnet, replace_after=0.5)
    wallet = client.wallet(devnet.key("requester"))
    nonce = wallet._count("latest")
    # Given a first transaction the node dropped from its pool (anvil_dropTransaction)
    first_hash = wallet.transact(_approve(wallet, 1), wait=False)
    devnet.rpc("anvil_dropTransaction", [first_hash])
    assert nonce not in _pool_content(devnet, wallet.address)
    # When a second one is sent and blocks are mined
    devnet.rpc("evm_setAutomine", [True])
    receipt = wallet.transact(_approve(wallet, 2))
    # Then the first was broadcast again (same hash) and both were mined in order
    assert isinstance(receipt, Receipt)
    first = client.eth.get_transaction_receipt(first_hash)
    assert first["status"] == 1 and first["blockNumber"] <= receipt.block_number
    assert wallet._count("latest") == nonce + 2
    assert client.hub.functions.allowance(wallet.address, SPENDER).call() == 2


def test_a_nonce_taken_by_another_sender_is_a_clear_error(manual_mining: DevnetHandle) -> None:
    devnet = manual_mining
    client = _client(devnet, replace_after=3)
    wallet = client.wallet(devnet.key("requester"))
    nonce = wallet._count("latest")
    thread, out = _in_thread(lambda: wallet.transact(_approve(wallet, 5)))
    _wait_for(lambda: nonce in _pool_content(devnet, wallet.address))
    # Given another process (same key, its own nonce counter) uses the nonce with a much
    # higher fee, and ours is dropped from the pool in favour of it
    other = _client(devnet, replace_after=1000).wallet(devnet.key("requester"))
    ours = _pool_content(devnet, wallet.address)[nonce]["hash"]
    devnet.rpc("anvil_dropTransaction", [ours])
    chain_mod.reset_nonces()
    other.gas_price_multiplier = 50
    other_hash = other.transact(_approve(other, 99), wait=False)
    devnet.rpc("evm_setAutomine", [True])
    devnet.rpc("evm_mine", [])
    thread.join(timeout=20)
    # Then our wait ends with the reason
    error = out.get("error")
    assert isinstance(error, TransactionReverted), out
    assert f"nonce {nonce}" in str(error) and "another transaction" in str(error)
    assert client.eth.get_transaction_receipt(other_hash)["status"] == 1
