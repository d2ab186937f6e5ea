"""Typed iExec orders with EIP-712 signing and order hashes.

The four order kinds are the EIP-712 structs of PoCo v5/v6 (``IexecLibOrders_v5``); the
on-chain structs add a trailing ``bytes sign`` that is not part of the hash. Orders read and
write the iExec SDK's JSON shape (lower-case field names, ``salt`` and ``sign`` as hex).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Self

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import is_address, keccak, to_checksum_address

from poco.tags import encode_tag

ZERO_ADDRESS = "0x0000000000000000000000000000000000000000"
ZERO_BYTES32 = "0x" + "00" * 32

DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


class OrderError(ValueError):
    """An order that is malformed (bad address, negative number, bad hex, unknown field)."""


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain of a PoCo deployment: ``("iExecODB", "5.0.0", chainId, proxy)``."""

    chain_id: int
    verifying_contract: str
    name: str = "iExecODB"
    version: str = "5.0.0"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }

    def separator(self) -> bytes:
        """keccak256 of the encoded domain, equal to the proxy's ``eip712domain_separator()``."""
        typehash = keccak(
            text="EIP712Domain(string name,string version,uint256 chainId,"
            "address verifyingContract)"
        )
        return keccak(
            abi_encode(
                ["bytes32", "bytes32", "bytes32", "uint256", "address"],
                [
                    typehash,
                    keccak(text=self.name),
                    keccak(text=self.version),
                    self.chain_id,
                    to_checksum_address(self.verifying_contract),
                ],
            )
        )


def random_salt() -> str:
    return "0x" + os.urandom(32).hex()


def _address(name: str, value: Any) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise OrderError(f"{name}: {value!r} is not an address")
    return to_checksum_address(value)


def _uint(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise OrderError(f"{name}: {value!r} is not an unsigned integer")
    try:
        number = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError) as exc:
        raise OrderError(f"{name}: {value!r} is not an unsigned integer") from exc
    if number < 0 or number >= 1 << 256:
        raise OrderError(f"{name}: {value!r} is out of the uint256 range")
    return number


def _bytes32(name: str, value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        value = "0x" + bytes(value).hex()
    if not isinstance(value, str) or not value.startswith("0x") or len(value) != 66:
        raise OrderError(f"{name}: {value!r} is not a 0x-prefixed bytes32 hex value")
    try:
        bytes.fromhex(value[2:])
    except ValueError as exc:
        raise OrderError(f"{name}: {value!r} is not hex") from exc
    return value.lower()


def _tag(name: str, value: Any) -> str:
    try:
        return encode_tag(value)
    except ValueError as exc:
        raise OrderError(f"{name}: {exc}") from exc


def _hexbytes(name: str, value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return "0x" + bytes(value).hex()
    if value in (None, ""):
        return "0x"
    if not isinstance(value, str) or not value.startswith("0x"):
        raise OrderError(f"{name}: {value!r} is not 0x-prefixed hex")
    try:
        bytes.fromhex(value[2:])
    except ValueError as exc:
        raise OrderError(f"{name}: {value!r} is not hex") from exc
    return value.lower()


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise OrderError(f"{name}: {value!r} is not a string")
    return value


_NORMALIZERS = {
    "address": _address,
    "uint256": _uint,
    "bytes32": _bytes32,
    "string": _string,
}


@dataclass(frozen=True)
class Order:
    """Base of the four order kinds. Subclasses list their EIP-712 fields in ``EIP712``."""

    PRIMARY: ClassVar[str] = ""
    EIP712: ClassVar[tuple[tuple[str, str], ...]] = ()
    sign: str = field(default="0x", kw_only=True)

    def __post_init__(self) -> None:
        for name, typ in self.EIP712:
            value = getattr(self, name)
            norm = _tag(name, value) if name == "tag" else _NORMALIZERS[typ](name, value)
            object.__setattr__(self, name, norm)
        object.__setattr__(self, "sign", _hexbytes("sign", self.sign))

    # ---- JSON -----------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from the iExec SDK / market JSON shape; unknown keys are refused."""
        if not isinstance(data, dict):
            raise OrderError(f"{cls.PRIMARY}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise OrderError(f"{cls.PRIMARY}: unknown field(s) {', '.join(sorted(unknown))}")
        missing = [name for name, _ in cls.EIP712 if name not in data]
        if missing:
            raise OrderError(f"{cls.PRIMARY}: missing field(s) {', '.join(missing)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name) for name, _ in self.EIP712}
        out["sign"] = self.sign
        return out

    # ---- EIP-712 --------------------------------------------------------------------------
    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {}
        for name, typ in self.EIP712:
            value = getattr(self, name)
            msg[name] = bytes.fromhex(value[2:]) if typ == "bytes32" else value
        return msg

    def typed_data(self, domain: Domain) -> dict[str, Any]:
        return {
            "types": {
                "EIP712Domain": DOMAIN_TYPE,
                self.PRIMARY: [{"name": n, "type": t} for n, t in self.EIP712],
            },
            "primaryType": self.PRIMARY,
            "domain": domain.as_dict(),
            "message": self.message(),
        }

    def hash(self, domain: Domain) -> str:
        """The order hash: keccak256(0x1901 ‖ domainSeparator ‖ structHash), as PoCo keys it."""
        sm = encode_typed_data(full_message=self.typed_data(domain))
        return "0x" + keccak(b"\x19" + sm.version + sm.header + sm.body).hex()

    def signed(self, private_key: str | bytes, domain: Domain) -> Self:
        """A copy carrying the EIP-712 signature of ``private_key``."""
        signature = Account.sign_typed_data(private_key, full_message=self.typed_data(domain))
        return replace(self, sign="0x" + bytes(signature.signature).hex())

    def recover_signer(self, domain: Domain) -> str:
        if self.sign in ("0x", ""):
            raise OrderError(f"{self.PRIMARY} is not signed")
        sm = encode_typed_data(full_message=self.typed_data(domain))
        try:
            return str(Account.recover_message(sm, signature=bytes.fromhex(self.sign[2:])))
        except Exception as exc:  # eth_keys raises several types for a malformed signature
            raise OrderError(f"{self.PRIMARY}: signature does not decode: {exc}") from exc

    def as_tuple(self) -> tuple[Any, ...]:
        """Arguments for the contract: EIP-712 fields in order, then ``sign``."""
        values: list[Any] = []
        for name, typ in self.EIP712:
            value = getattr(self, name)
            values.append(bytes.fromhex(value[2:]) if typ == "bytes32" else value)
        values.append(bytes.fromhex(self.sign[2:]))
        return tuple(values)

    def with_salt(self, salt: str | None = None) -> Self:
        return replace(self, salt=salt or random_salt(), sign="0x")  # type: ignore[call-arg]


@dataclass(frozen=True)
class AppOrder(Order):
    PRIMARY: ClassVar[str] = "AppOrder"
    EIP712: ClassVar[tuple[tuple[str, str], ...]] = (
        ("app", "address"),
        ("appprice", "uint256"),
        ("volume", "uint256"),
        ("tag", "bytes32"),
        ("datasetrestrict", "address"),
        ("workerpoolrestrict", "address"),
        ("requesterrestrict", "address"),
        ("salt", "bytes32"),
    )
    app: str = ZERO_ADDRESS
    appprice: int = 0
    volume: int = 1
    tag: str = ZERO_BYTES32
    datasetrestrict: str = ZERO_ADDRESS
    workerpoolrestrict: str = ZERO_ADDRESS
    requesterrestrict: str = ZERO_ADDRESS
    salt: str = ZERO_BYTES32


@dataclass(frozen=True)
class DatasetOrder(Order):
    PRIMARY: ClassVar[str] = "DatasetOrder"
    EIP712: ClassVar[tuple[tuple[str, str], ...]] = (
        ("dataset", "address"),
        ("datasetprice", "uint256"),
        ("volume", "uint256"),
        ("tag", "bytes32"),
        ("apprestrict", "address"),
        ("workerpoolrestrict", "address"),
        ("requesterrestrict", "address"),
        ("salt", "bytes32"),
    )
    dataset: str = ZERO_ADDRESS
    datasetprice: int = 0
    volume: int = 0
    tag: str = ZERO_BYTES32
    apprestrict: str = ZERO_ADDRESS
    workerpoolrestrict: str = ZERO_ADDRESS
    requesterrestrict: str = ZERO_ADDRESS
    salt: str = ZERO_BYTES32


@dataclass(frozen=True)
class WorkerpoolOrder(Order):
    PRIMARY: ClassVar[str] = "WorkerpoolOrder"
    EIP712: ClassVar[tuple[tuple[str, str], ...]] = (
        ("workerpool", "address"),
        ("workerpoolprice", "uint256"),
        ("volume", "uint256"),
        ("tag", "bytes32"),
        ("category", "uint256"),
        ("trust", "uint256"),
        ("apprestrict", "address"),
        ("datasetrestrict", "address"),
        ("requesterrestrict", "address"),
        ("salt", "bytes32"),
    )
    workerpool: str = ZERO_ADDRESS
    workerpoolprice: int = 0
    volume: int = 1
    tag: str = ZERO_BYTES32
    category: int = 0
    trust: int = 0
    apprestrict: str = ZERO_ADDRESS
    datasetrestrict: str = ZERO_ADDRESS
    requesterrestrict: str = ZERO_ADDRESS
    salt: str = ZERO_BYTES32


@dataclass(frozen=True)
class RequestOrder(Order):
    PRIMARY: ClassVar[str] = "RequestOrder"
    EIP712: ClassVar[tuple[tuple[str, str], ...]] = (
        ("app", "address"),
        ("appmaxprice", "uint256"),
        ("dataset", "address"),
        ("datasetmaxprice", "uint256"),
        ("workerpool", "address"),
        ("workerpoolmaxprice", "uint256"),
        ("requester", "address"),
        ("volume", "uint256"),
        ("tag", "bytes32"),
        ("category", "uint256"),
        ("trust", "uint256"),
        ("beneficiary", "address"),
        ("callback", "address"),
        ("params", "string"),
        ("salt", "bytes32"),
    )
    app: str = ZERO_ADDRESS
    appmaxprice: int = 0
    dataset: str = ZERO_ADDRESS
    datasetmaxprice: int = 0
    workerpool: str = ZERO_ADDRESS
    workerpoolmaxprice: int = 0
    requester: str = ZERO_ADDRESS
    volume: int = 1
    tag: str = ZERO_BYTES32
    category: int = 0
    trust: int = 0
    beneficiary: str = ZERO_ADDRESS
    callback: str = ZERO_ADDRESS
    params: str = ""
    salt: str = ZERO_BYTES32


ORDER_KINDS: dict[str, type[Order]] = {
    "apporder": AppOrder,
    "datasetorder": DatasetOrder,
    "workerpoolorder": WorkerpoolOrder,
    "requestorder": RequestOrder,
}
