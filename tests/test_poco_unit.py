"""Unit tests of the protocol kernel that need no chain (the chain-backed twins are in
test_poco_devnet.py)."""

from __future__ import annotations

import pytest

from poco.orders import Domain, OrderError, RequestOrder, WorkerpoolOrder, random_salt
from poco.proofs import recover_authorization_signer, sign_authorization, task_id
from poco.tags import TagError, decode_tag, encode_tag, has_bits, is_tee

KEY = "0x" + "11" * 32  # a throwaway key made up for this test
DOMAIN = Domain(chain_id=31337, verifying_contract="0x" + "22" * 20)


@pytest.mark.parametrize(
    ("given", "expected_low_byte_hex"),
    [
        ("standard", "0000"),
        ("tee,scone", "0003"),
        ("tee,gramine", "0005"),
        ("tee,tdx", "0009"),
        ("gpu", "0100"),
        (["tee", "scone", "gpu"], "0103"),
        ("0x" + "00" * 31 + "03", "0003"),
    ],
)
def test_tag_names_map_to_sdk_bits(given: object, expected_low_byte_hex: str) -> None:
    tag = encode_tag(given)  # type: ignore[arg-type]
    assert len(tag) == 66
    assert tag.endswith(expected_low_byte_hex)
    assert int(tag, 16) == int(expected_low_byte_hex, 16)


def test_tag_helpers() -> None:
    assert decode_tag("tee,scone") == ["tee", "scone"]
    assert is_tee("tee,gramine") and not is_tee("gpu")
    assert has_bits("tee,scone,gpu", "tee,scone")
    assert not has_bits("tee,scone", "gpu")
    with pytest.raises(TagError, match="unknown tag name 'sgx'"):
        encode_tag("tee,sgx")
    with pytest.raises(TagError):
        encode_tag("0x" + "f" * 65)


def test_order_json_roundtrip_and_signature_recovery() -> None:
    order = WorkerpoolOrder(
        workerpool="0x" + "ab" * 20,
        workerpoolprice="1000",  # type: ignore[arg-type]  # a string as from JSON: coerced
        volume=3,
        tag="tee,scone",
        trust=1,
        salt=random_salt(),
    )
    signed = order.signed(KEY, DOMAIN)
    assert len(bytes.fromhex(signed.sign[2:])) == 65
    again = WorkerpoolOrder.from_dict(signed.to_dict())
    assert again == signed
    assert again.workerpoolprice == 1000 and again.tag.endswith("03")
    from eth_account import Account

    assert again.recover_signer(DOMAIN) == Account.from_key(KEY).address
    # the hash does not depend on the signature, and changes with any field
    assert signed.hash(DOMAIN) == order.hash(DOMAIN)
    assert order.with_salt().hash(DOMAIN) != order.hash(DOMAIN)


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"workerpool": "0x1234"}, "workerpool: '0x1234' is not an address"),
        ({"volume": -1}, "volume: -1 is out of the uint256 range"),
        ({"trust": "many"}, "trust: 'many' is not an unsigned integer"),
        ({"salt": "0x12"}, "salt: '0x12' is not a 0x-prefixed bytes32"),
        ({"tag": "tee,sgx"}, "unknown tag name"),
        ({"colour": "blue"}, "unknown field"),
    ],
)
def test_malformed_orders_are_refused_with_the_field_named(patch: dict, message: str) -> None:
    data = WorkerpoolOrder(workerpool="0x" + "ab" * 20).to_dict()
    data.update(patch)
    with pytest.raises(OrderError, match=message):
        WorkerpoolOrder.from_dict(data)


def test_missing_field_is_named() -> None:
    data = RequestOrder().to_dict()
    del data["params"]
    with pytest.raises(OrderError, match="missing field.*params"):
        RequestOrder.from_dict(data)


def test_authorization_recovers_to_the_signer() -> None:
    from eth_account import Account

    worker = "0x" + "33" * 20
    tid = task_id("0x" + "44" * 32, 0)
    sig = sign_authorization(KEY, worker, tid)
    assert recover_authorization_signer(sig, worker, tid) == Account.from_key(KEY).address
    assert recover_authorization_signer(sig, "0x" + "55" * 20, tid) != Account.from_key(KEY).address
