"""Identifiers and proofs of PoCo: dealid, taskid, authorizations, resultHash/resultSeal.

Every formula here was checked against the deployed contracts (docs/protocol.md):
``packed`` is ``abi.encodePacked`` and maps to ``Web3.solidity_keccak``.
"""

from __future__ import annotations

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import keccak, to_checksum_address
from web3 import Web3

from poco.orders import ZERO_ADDRESS


def _b32(value: str | bytes) -> bytes:
    if isinstance(value, str):
        raw = bytes.fromhex(value[2:] if value.startswith("0x") else value)
    else:
        raw = bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def hex32(value: bytes) -> str:
    return "0x" + bytes(value).hex()


def deal_id(request_order_hash: str | bytes, consumed_before: int) -> str:
    """dealid = keccak256(packed(requestOrderHash, viewConsumed(requestOrderHash) before match))."""
    return hex32(
        Web3.solidity_keccak(["bytes32", "uint256"], [_b32(request_order_hash), consumed_before])
    )


def task_id(dealid: str | bytes, index: int) -> str:
    """taskid = keccak256(packed(dealid, idx)), idx in [botFirst, botFirst + botSize).
    (``packed`` of a bytes32 and a uint256 is their 64 bytes: hashed without web3's
    type-checking encoder, which took most of the time of storing a large deal.)"""
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < 2**256:
        raise ValueError(f"a task index is a uint256, not {index!r}")
    return hex32(keccak(_b32(dealid) + index.to_bytes(32, "big")))


def authorization_digest(worker: str, taskid: str | bytes, enclave: str = ZERO_ADDRESS) -> bytes:
    """The 32 bytes the scheduler signs (EIP-191) to authorize (worker, taskid, enclave)."""
    return bytes(
        Web3.solidity_keccak(
            ["address", "bytes32", "address"],
            [to_checksum_address(worker), _b32(taskid), to_checksum_address(enclave)],
        )
    )


def sign_authorization(
    private_key: str | bytes, worker: str, taskid: str | bytes, enclave: str = ZERO_ADDRESS
) -> str:
    """The scheduler's signature that lets ``worker`` contribute to ``taskid``."""
    digest = authorization_digest(worker, taskid, enclave)
    signed = Account.sign_message(encode_defunct(primitive=digest), private_key)
    return "0x" + bytes(signed.signature).hex()


def recover_authorization_signer(
    signature: str, worker: str, taskid: str | bytes, enclave: str = ZERO_ADDRESS
) -> str:
    digest = authorization_digest(worker, taskid, enclave)
    return str(
        Account.recover_message(
            encode_defunct(primitive=digest), signature=bytes.fromhex(signature.removeprefix("0x"))
        )
    )


def abort_digest(worker: str, taskid: str | bytes, cause: str, reason: str) -> bytes:
    """The 32 bytes the scheduler signs (EIP-191) to tell ``worker`` its replicate of
    ``taskid`` is no longer needed (a pool's own message, not PoCo's: the leading string keeps
    it apart from an authorization)."""
    return bytes(
        Web3.solidity_keccak(
            ["string", "address", "bytes32", "string", "string"],
            ["workerpool.abort", to_checksum_address(worker), _b32(taskid), cause, reason],
        )
    )


def sign_abort(
    private_key: str | bytes, worker: str, taskid: str | bytes, cause: str, reason: str
) -> str:
    signed = Account.sign_message(
        encode_defunct(primitive=abort_digest(worker, taskid, cause, reason)), private_key
    )
    return "0x" + bytes(signed.signature).hex()


def recover_abort_signer(
    signature: str, worker: str, taskid: str | bytes, cause: str, reason: str
) -> str:
    """Who signed an abort; ValueError when the signature is not one."""
    digest = abort_digest(worker, taskid, cause, reason)
    try:
        return str(
            Account.recover_message(
                encode_defunct(primitive=digest),
                signature=bytes.fromhex(signature.removeprefix("0x")),
            )
        )
    except Exception as exc:  # eth_account raises several kinds for a malformed signature
        raise ValueError(f"not a signature: {exc}") from exc


def result_hash(taskid: str | bytes, result_digest: str | bytes) -> str:
    """resultHash = keccak256(packed(taskid, resultDigest)): the public part of a contribution."""
    return hex32(Web3.solidity_keccak(["bytes32", "bytes32"], [_b32(taskid), _b32(result_digest)]))


def result_seal(worker: str, taskid: str | bytes, result_digest: str | bytes) -> str:
    """resultSeal = keccak256(packed(worker, taskid, resultDigest)): ties a digest to a worker."""
    return hex32(
        Web3.solidity_keccak(
            ["address", "bytes32", "bytes32"],
            [to_checksum_address(worker), _b32(taskid), _b32(result_digest)],
        )
    )


def sign_enclave(enclave_key: str | bytes, res_hash: str | bytes, res_seal: str | bytes) -> str:
    """An enclave's signature (EIP-191) over keccak256(packed(resultHash, resultSeal))."""
    digest = Web3.solidity_keccak(["bytes32", "bytes32"], [_b32(res_hash), _b32(res_seal)])
    signed = Account.sign_message(encode_defunct(primitive=bytes(digest)), enclave_key)
    return "0x" + bytes(signed.signature).hex()


def callback_digest(callback_data: bytes) -> str:
    """With a callback, the result digest must be keccak256 of the callback data."""
    return hex32(keccak(callback_data))
