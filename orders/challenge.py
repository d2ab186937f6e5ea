"""The orderbook's login (the iExec market API's): a one-time challenge the signer of
an order signs as EIP-712 typed data and sends back in the ``Authorization`` header."""

from __future__ import annotations

import logging
import secrets
import string
from collections.abc import Mapping
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

log = logging.getLogger(__name__)

# The market API's challenge (iexec-market-api services/auth.js); iExec tooling signs this.
CHALLENGE_DOMAIN_NAME = "iExec Gateway"
CHALLENGE_DOMAIN_VERSION = "1"
CHALLENGE_TEXT = "Sign this message to log into iExec Gateway: "
CHALLENGE_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
]


# ---- the challenge (market API authorization) -------------------------------------------------
def challenge_typed_data(chain_id: int, text: str) -> dict[str, Any]:
    """The EIP-712 typed data of a login challenge, as the iExec market serves it."""
    return {
        "types": {
            "EIP712Domain": CHALLENGE_DOMAIN_TYPE,
            "Challenge": [{"name": "challenge", "type": "string"}],
        },
        "domain": {
            "name": CHALLENGE_DOMAIN_NAME,
            "version": CHALLENGE_DOMAIN_VERSION,
            "chainId": int(chain_id),
        },
        "primaryType": "Challenge",
        "message": {"challenge": text},
    }


def typed_data_hash(typed: Mapping[str, Any]) -> str:
    """The EIP-712 digest (keccak256(0x1901 ‖ domainSeparator ‖ structHash))."""
    sm = encode_typed_data(full_message=dict(typed))
    return "0x" + keccak(b"\x19" + sm.version + sm.header + sm.body).hex()


def authorization_header(typed: Mapping[str, Any], private_key: str | bytes) -> str:
    """``<hash>_<signature>_<address>``: what iExec tooling sends as ``Authorization``."""
    account = Account.from_key(private_key)
    signature = Account.sign_typed_data(private_key, full_message=dict(typed)).signature
    return f"{typed_data_hash(typed)}_0x{bytes(signature).hex()}_{account.address}"


def random_text(length: int = 32) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))
